"""``crystaloop bench``: benchmarks whose numbers go in issue notes and the README.

Each area registers its own commands from its own module (``register(app)``).
"""

from __future__ import annotations

from crystaloop.cli import bench_campaign, bench_db, bench_dft, bench_generate, bench_representation
from crystaloop.cli._common import group

app = group("Benchmarks with numbers to report.")

for _module in (bench_db, bench_representation, bench_dft, bench_generate, bench_campaign):
    _module.register(app)

from crystaloop.cli import bench_presets  # noqa: E402  (registered on its own line)

bench_presets.register(app)

from crystaloop.cli import bench_cluster  # noqa: E402  (registered on its own line)

bench_cluster.register(app)

from crystaloop.cli import bench_realism  # noqa: E402

bench_realism.register(app)

from crystaloop.cli import bench_oracle  # noqa: E402

bench_oracle.register(app)
