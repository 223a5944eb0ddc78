"""Benchmarks: the numbers ``crystaloop bench`` (and ``data bench-loader``) measure and report.

One module per benchmark, named for what it measures; :mod:`.targets` holds every target and
the papers' figures quoted beside them. Library code never imports this package.

============== ============================ ==============================================
module         command                      measures
============== ============================ ==============================================
``database``   ``bench db``                 candidate-store inserts and queries
``roundtrip``  ``bench representation``     voxelize -> segment -> structure round trip
``dft``        ``bench dft``                framework overhead per relaxation
``presets``    ``bench presets``            DFT presets on the binary test set
``oracle``     ``bench oracle``             DFT formation energies against experiment
``cluster``    ``bench cluster``            scheduling of the execution backends
``generation`` ``bench generate``           generation throughput, the paper's Table 2
``campaign``   ``bench campaign``           the loop against random and no-model arms
``realism``    ``bench realism``            CHGNet volumes of prototypes vs experiment
``loader``     ``data bench-loader``        voxel loader throughput
============== ============================ ==============================================
"""
