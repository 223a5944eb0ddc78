"""Pseudopotential families: a directory plus a YAML table of files, md5s and cutoffs.

A family YAML has the shape of quacc's SSSP presets::

    name: local-pbe
    functional: PBE
    cutoff_policy: "..."
    pseudopotentials:
      Si: {filename: Si.pbe-nl-rrkjus_psl.1.0.0.UPF, md5: ..., ecutwfc: 45.0, ecutrho: 360.0}

``build_local_family`` assembles a real PBE family from Debian's Quantum
ESPRESSO packages (stock UPFs, ld1.x-generated PAWs and PBE files shipped
among the examples).
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pymatgen.core import Element, Structure

from crystaloop.errors import UserError

DEBIAN_PSEUDO_DIR = Path("/usr/share/espresso/pseudo")
QE_EXAMPLES_DIR = Path("/usr/share/doc/quantum-espresso/examples")
PAW_INPUT_DIR = QE_EXAMPLES_DIR / "atomic" / "paw_examples" / "input"
EXAMPLE_PBE_FILES = (
    "GWW/example04/Ag_ONCV_PBE-1.0.upf.gz",
    "PP/simple_transport/scf/As.pbe-n-kjpaw_psl.0.2.upf.gz",
    "PP/simple_transport/scf/Ga.pbe-dn-kjpaw_psl.0.2.upf.gz",
)
CUTOFF_POLICY = (
    "ecutwfc = the UPF's suggested wavefunction cutoff rounded up to 5 Ry (45 Ry when the file "
    "suggests none); ecutrho = max(suggested density cutoff, dual x ecutwfc) with dual 4 for "
    "norm-conserving and 8 for ultrasoft/PAW files. No convergence runs."
)
DEFAULT_ECUTWFC_RY = 45.0
#: ld1.x inputs shipped with crystaloop; each replaces QE's stock input for its element.
SHIPPED_LD1_DIR = Path(__file__).parent / "data" / "ld1"
#: Verdicts of 'crystaloop dft pseudos verify' for the files build-local picks, by file name
#: (ld1.x stamps the generation date into a UPF, so md5s differ between builds).
LOCAL_VERDICTS = Path(__file__).parent / "data" / "local_pbe_verdicts.yaml"
#: libyaml's safe loader when available (ten times faster than the pure-Python one).
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
#: pw.x 6.7's XML reader refuses lines longer than this; ld1.x 6.7 writes longer ones.
MAX_UPF_LINE = 1000
_NUMBERS_PER_LINE = 4
_NUMERIC_LINE = re.compile(r"^[\s0-9eEdD+\-.]+$")


class PseudoEntry(BaseModel):
    """One element's pseudopotential in a family."""

    model_config = ConfigDict(extra="forbid")

    filename: str
    md5: str
    ecutwfc: float = Field(gt=0, description="Suggested wavefunction cutoff, Ry.")
    ecutrho: float = Field(gt=0, description="Suggested charge-density cutoff, Ry.")
    pseudo_type: str | None = Field(None, description="NC, US or PAW.")
    source: str | None = Field(None, description="Where the file came from.")
    verdict: Literal["verified", "marginal", "failed", "unverified"] = Field(
        "unverified",
        description="Against all-electron PBE ('crystaloop dft pseudos verify'); campaigns "
        "refuse elements that are not verified.",
    )
    verification: dict[str, Any] | None = Field(
        None, description="The numbers behind the verdict (eV/atom, Å^3/atom, GPa)."
    )


class PseudoFamily(BaseModel):
    """A pseudopotential family: per element, the file, its md5 and cutoffs (Ry)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    functional: str = "PBE"
    cutoff_policy: str | None = None
    pseudo_dir: Path | None = Field(
        None, description="Directory of the files; default: the YAML's own directory."
    )
    pseudopotentials: dict[str, PseudoEntry]

    @property
    def elements(self) -> list[str]:
        """The covered element symbols, sorted by atomic number."""
        return sorted(self.pseudopotentials, key=lambda s: Element(s).Z)

    def verdict(self, element: str) -> str:
        """The element's verification verdict (``unverified`` when the family lacks it)."""
        entry = self.pseudopotentials.get(element)
        return entry.verdict if entry is not None else "unverified"

    def missing(self, elements: Iterable[str]) -> list[str]:
        """Elements in ``elements`` the family has no file for."""
        return sorted({str(e) for e in elements} - set(self.pseudopotentials))

    def require(self, structure: Structure) -> None:
        """Raise one clear error listing the elements of ``structure`` the family lacks.

        Raises
        ------
        UserError
            Some elements have no pseudopotential.
        """
        missing = self.missing(el.symbol for el in structure.composition.elements)
        if missing:
            raise UserError(
                f"pseudopotential family '{self.name}' has no file for {', '.join(missing)} "
                f"(it covers {' '.join(self.elements)}); add them to the family YAML or point "
                "CRYSTALOOP_PSEUDO_DIR/CRYSTALOOP_PSEUDO_FAMILY at SSSP or pslibrary"
            )

    def pseudopotentials_for(self, structure: Structure) -> dict[str, str]:
        """Element -> file name for the species of ``structure`` (raises if any is missing)."""
        self.require(structure)
        return {
            el.symbol: self.pseudopotentials[el.symbol].filename
            for el in structure.composition.elements
        }

    def md5s_for(self, structure: Structure) -> dict[str, str]:
        """Element -> md5 for the species of ``structure``."""
        self.require(structure)
        return {el.symbol: self.pseudopotentials[el.symbol].md5 for el in structure.composition}

    def cutoffs_for(self, structure: Structure) -> tuple[float, float]:
        """``(ecutwfc, ecutrho)`` in Ry: the maximum over the structure's elements."""
        self.require(structure)
        return self.cutoffs_for_elements(el.symbol for el in structure.composition.elements)

    def cutoffs_for_elements(self, elements: Iterable[str]) -> tuple[float, float]:
        """``(ecutwfc, ecutrho)`` in Ry: the maximum suggestion over ``elements``.

        Raises
        ------
        UserError
            The family lacks some of the elements.
        """
        elements = list(elements)
        missing = self.missing(elements)
        if missing:
            raise UserError(
                f"pseudopotential family '{self.name}' has no file for {', '.join(missing)}; "
                "add them to the family YAML or choose another family"
            )
        entries = [self.pseudopotentials[el] for el in elements]
        return max(e.ecutwfc for e in entries), max(e.ecutrho for e in entries)


def load_family(path: Path | str, pseudo_dir: Path | str | None = None) -> PseudoFamily:
    """Read a family YAML; ``pseudo_dir`` (else the YAML's value, else its folder) holds the files.

    The family's ``pseudo_dir`` is made absolute, since pw.x runs in each job's own folder: a
    relative ``pseudo_dir`` argument against the current directory, a relative YAML value
    against the YAML's folder.

    Raises
    ------
    UserError
        The file is missing or invalid.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(
            f"pseudopotential family {path} does not exist; run 'crystaloop dft pseudos "
            "build-local' or set CRYSTALOOP_PSEUDO_FAMILY to an SSSP/pslibrary family YAML"
        )
    try:
        data = yaml.load(path.read_text(), Loader=SAFE_LOADER) or {}
        family = PseudoFamily.model_validate(data)
    except (yaml.YAMLError, ValueError) as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"pseudopotential family {path} is invalid ({first}); fix the YAML") from None
    if pseudo_dir:
        resolved = Path(pseudo_dir).expanduser()
    elif family.pseudo_dir is not None:
        resolved = path.parent / family.pseudo_dir.expanduser()
    else:
        resolved = path.parent
    return family.model_copy(update={"pseudo_dir": resolved.resolve()})


def family_from_settings(settings=None) -> PseudoFamily:
    """The family configured in settings (``pseudo_family`` YAML, files in ``pseudo_dir``)."""
    from crystaloop.settings import get_settings

    settings = settings or get_settings()
    family_path = settings.resolved_pseudo_family()
    pseudo_dir = settings.pseudo_dir if settings.pseudo_dir else None
    family = load_family(family_path, pseudo_dir)
    if pseudo_dir is None and family.pseudo_dir is None:
        family = family.model_copy(update={"pseudo_dir": settings.resolved_pseudo_dir()})
    return family


def md5sum(path: Path | str) -> str:
    """Hex md5 of a file."""
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


@dataclass(frozen=True)
class UpfHeader:
    """The few UPF header fields a family needs (v1 and v2 formats)."""

    element: str
    functional: str
    pseudo_type: str
    wfc_cutoff: float
    rho_cutoff: float
    has_so: bool

    @property
    def is_pbe(self) -> bool:
        """True for PBE exchange-correlation (named, or as SLA PW PBX/PBE PBC/PBE)."""
        tokens = self.functional.upper().split()
        if tokens[:1] == ["PBE"]:
            return True
        return tokens[:4] in (["SLA", "PW", "PBX", "PBC"], ["SLA", "PW", "PBE", "PBE"])


class UpfHeaderError(UserError, ValueError):
    """A UPF header field that cannot be read (names the file and the field)."""


def read_upf_header(text: str, source: str = "<UPF text>") -> UpfHeader:
    """Parse the header of a UPF file given as text; ``source`` names the file in errors.

    A cutoff the file does not give is 0.0 (no suggestion); one it gives but that is not
    a number raises, so it never silently becomes the default cutoff.

    Raises
    ------
    ValueError
        No recognisable header.
    UpfHeaderError
        A cutoff field is present but unreadable.
    """
    match = re.search(r"<PP_HEADER\s([^>]*)/?>", text, re.S)
    if match and "element=" in match.group(1):
        attrs = dict(re.findall(r'(\w+)\s*=\s*"([^"]*)"', match.group(1)))
        return UpfHeader(
            element=attrs["element"].strip(),
            functional=attrs.get("functional", "").strip(),
            pseudo_type=_normalise_type(attrs.get("pseudo_type", "")),
            wfc_cutoff=_float(attrs.get("wfc_cutoff"), "wfc_cutoff", source),
            rho_cutoff=_float(attrs.get("rho_cutoff"), "rho_cutoff", source),
            has_so=attrs.get("has_so", "F").strip().upper() in {"T", "TRUE", ".TRUE."},
        )
    block = re.search(r"<PP_HEADER>(.*?)</PP_HEADER>", text, re.S)
    if not block:
        raise ValueError("no PP_HEADER")
    fields: dict[str, str] = {}
    for line in block.group(1).splitlines():
        for key, label in (
            ("element", "Element"),
            ("functional", "Exchange-Correlation functional"),
            ("cutoffs", "Suggested cutoff"),
            ("type", "pseudopotential"),
        ):
            if label in line and key not in fields:
                fields[key] = line.split(label)[0] if key != "type" else line.split()[0]
    values = fields.get("cutoffs", "0 0").split()
    ptype = fields.get("type", "").upper()
    return UpfHeader(
        element=fields["element"].strip(),
        functional=" ".join(fields.get("functional", "").split()[:4]),
        pseudo_type="US" if ptype == "US" else ("PAW" if ptype == "PAW" else "NC"),
        wfc_cutoff=_float(values[0] if values else None, "Suggested cutoff (wfc)", source),
        rho_cutoff=_float(values[1] if len(values) > 1 else None, "Suggested cutoff (rho)", source),
        has_so="<PP_ADDINFO>" in text or "fully-relativistic" in text[:5000].lower(),
    )


def _normalise_type(value: str) -> str:
    value = value.strip().upper()
    return {"USPP": "US", "SL": "NC", "1/R": "NC"}.get(value, value)


def _float(value: str | None, field: str, source: str) -> float:
    """A header number (Fortran ``D`` exponents allowed); None (field absent) is 0.0."""
    if value is None:
        return 0.0
    try:
        return float(value.strip().replace("D", "E").replace("d", "e"))
    except ValueError:
        raise UpfHeaderError(
            f"{source}: UPF header field {field} = {value!r} is not a number; "
            "fix or replace the file"
        ) from None


def rewrap_long_lines(path: Path | str, max_length: int = MAX_UPF_LINE) -> int:
    """Split over-long purely numeric lines of a UPF into short ones (whitespace only).

    Returns the number of lines re-wrapped; the numbers and their order are unchanged.
    """
    path = Path(path)
    lines = path.read_text().splitlines()
    out: list[str] = []
    changed = 0
    for line in lines:
        if len(line) > max_length and _NUMERIC_LINE.match(line):
            tokens = line.split()
            for i in range(0, len(tokens), _NUMBERS_PER_LINE):
                out.append("  " + "  ".join(tokens[i : i + _NUMBERS_PER_LINE]))
            changed += 1
        else:
            out.append(line)
    if changed:
        path.write_text("\n".join(out) + "\n")
    return changed


def suggested_cutoffs(header: UpfHeader) -> tuple[float, float]:
    """``(ecutwfc, ecutrho)`` in Ry from a UPF header, following ``CUTOFF_POLICY``."""
    wfc = header.wfc_cutoff if header.wfc_cutoff > 0 else DEFAULT_ECUTWFC_RY
    wfc = 5.0 * math.ceil(wfc / 5.0 - 1e-9)
    dual = 4.0 if header.pseudo_type == "NC" else 8.0
    return wfc, max(header.rho_cutoff, dual * wfc)


@dataclass
class Candidate:
    """A PBE file that could represent an element."""

    path: Path
    header: UpfHeader
    source: str

    @property
    def rank(self) -> tuple:
        """Higher is preferred: pslibrary 1.x, then ld1.x PAW, then files with cutoffs."""
        name = self.path.name
        return (
            self.source == "ld1.x (crystaloop input)",
            "psl.1." in name,
            self.source.startswith("ld1.x"),
            self.header.wfc_cutoff > 0,
            {"PAW": 2, "US": 1}.get(self.header.pseudo_type, 0),
            name,
        )


def generate_paw(input_file: Path, workdir: Path) -> tuple[Path | None, str]:
    """Run ``ld1.x`` on one stock PAW input in ``workdir``; returns (UPF or None, reason)."""
    workdir.mkdir(parents=True, exist_ok=True)
    text = input_file.read_text()
    prefix = re.search(r"prefix\s*=\s*'([^']*)'", text)
    if prefix and "/" in prefix.group(1):
        (workdir / prefix.group(1).rsplit("/", 1)[0]).mkdir(parents=True, exist_ok=True)
    target = re.search(r"file_pseudopw\s*=\s*'([^']*)'", text)
    try:
        proc = subprocess.run(
            ["ld1.x"], input=text, cwd=workdir, capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"ld1.x did not run ({exc.__class__.__name__})"
    (workdir / "ld1.out").write_text(proc.stdout + proc.stderr)
    upf = workdir / target.group(1) if target else None
    if proc.returncode == 0 and upf is not None and upf.is_file():
        return upf, "ok"
    for pattern in ("negative rho", "PS-KS", "error", "Error"):
        for line in (proc.stdout + proc.stderr).splitlines():
            if pattern in line and "final scf error" not in line:
                return None, line.strip()
    return None, f"ld1.x exited with {proc.returncode}"


@dataclass
class BuildReport:
    """What ``build_local_family`` did."""

    family_path: Path
    elements: list[str]
    chosen: dict[str, str]
    ld1_ok: list[str]
    ld1_failed: dict[str, str]
    rewrapped: dict[str, int]
    dropped: dict[str, str] = field(default_factory=dict)


def _gather_candidates(
    workdir: Path, use_ld1: bool, ld1_elements: Iterable[str] | None, jobs: int
) -> tuple[list[Candidate], list[str], dict[str, str]]:
    found: list[Candidate] = []
    if DEBIAN_PSEUDO_DIR.is_dir():
        for path in sorted(DEBIAN_PSEUDO_DIR.iterdir()):
            found.extend(_candidate(path, path.read_text(errors="replace"), "debian"))
    for rel in EXAMPLE_PBE_FILES:
        src = QE_EXAMPLES_DIR / rel
        if src.is_file():
            unpacked = workdir / "examples" / src.name.removesuffix(".gz")
            unpacked.parent.mkdir(parents=True, exist_ok=True)
            with gzip.open(src, "rt", errors="replace") as fh:
                unpacked.write_text(fh.read())
            found.extend(_candidate(unpacked, unpacked.read_text(), "qe-examples"))
    ok: list[str] = []
    failed: dict[str, str] = {}
    if use_ld1 and shutil.which("ld1.x") and PAW_INPUT_DIR.is_dir():
        wanted = {e.lower() for e in ld1_elements} if ld1_elements else None
        shipped = sorted(SHIPPED_LD1_DIR.glob("*.in")) if SHIPPED_LD1_DIR.is_dir() else []
        replaced = {p.name.split(".")[0].lower() for p in shipped}
        inputs = [
            p
            for p in [*sorted(PAW_INPUT_DIR.glob("*.in")), *shipped]
            if re.search(r"dft\s*=\s*'PBE'", p.read_text())
            and (wanted is None or _input_element(p) in wanted)
            and (p.parent == SHIPPED_LD1_DIR or _input_element(p) not in replaced)
        ]
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            results = list(
                pool.map(lambda p: generate_paw(p, workdir / "ld1" / p.stem), inputs)
            )
        for inp, (upf, reason) in zip(inputs, results, strict=True):
            if upf is None:
                failed[inp.stem] = reason
                continue
            ok.append(inp.stem)
            # A shipped input was chosen over the stock one on purpose: rank it first.
            source = "ld1.x (crystaloop input)" if inp.parent == SHIPPED_LD1_DIR else "ld1.x"
            found.extend(_candidate(upf, upf.read_text(), source))
    return found, ok, failed


def _input_element(path: Path) -> str:
    """The element of an ld1.x input file name (``Pd.in``, ``Li-1s.in``, ``Pd.pbe-...in``)."""
    return re.split(r"[.-]", path.name, maxsplit=1)[0].lower()


def _fails_structural_check(known: dict[str, Any]) -> bool:
    """True when a file's polymorph energy is off by more than twice the tolerance.

    Such a file penalises every environment unlike its reference prototype (the stock Pd put
    bcc 0.53 eV/atom too high, and CuPd above its elements), so it cannot judge any
    compound: build-local leaves it out. A file that fails only on the EOS stays in, marked
    ``failed``, and campaigns refuse it unless allowed.
    """
    from crystaloop.dft.verification import STRUCTURAL_GOOD_EV

    numbers = known.get("verification") or {}
    ours, ae = numbers.get("structural_energy_ev"), numbers.get("structural_energy_ae_ev")
    return ours is not None and ae is not None and abs(ours - ae) > 2 * STRUCTURAL_GOOD_EV


def local_verdicts() -> dict[str, dict[str, Any]]:
    """Shipped verdicts by element: ``{filename, verdict, verification}``."""
    if not LOCAL_VERDICTS.is_file():
        return {}
    data = yaml.load(LOCAL_VERDICTS.read_text(), Loader=SAFE_LOADER) or {}
    return data.get("elements", {})


def _candidate(path: Path, text: str, source: str) -> list[Candidate]:
    if not path.is_file():
        return []
    try:
        header = read_upf_header(text, str(path))
        Element(header.element)
    except UpfHeaderError:
        raise
    except (ValueError, KeyError):
        return []
    lowered = path.name.lower()
    if not header.is_pbe or header.has_so or ".rel-" in lowered or "coulomb" in lowered:
        return []
    if "gipaw" in lowered or path.name.startswith(f"{header.element}s."):
        return []
    return [Candidate(path, header, source)]


def build_local_family(
    dest: Path | str,
    *,
    use_ld1: bool = True,
    ld1_elements: Iterable[str] | None = None,
    jobs: int = 2,
    name: str = "local-pbe",
    include_failed: bool = False,
) -> BuildReport:
    """Assemble a PBE family from this machine's Quantum ESPRESSO files into ``dest``.

    Parameters
    ----------
    dest
        Target directory; receives the UPF files and ``family.yaml``.
    use_ld1
        Generate PAW potentials with ``ld1.x`` from QE's stock PBE inputs.
    ld1_elements
        Restrict ld1.x generation to these elements (default: every PBE input).
    jobs
        ld1.x runs in parallel.
    include_failed
        Keep elements whose file failed the structural-energy check (left out by default).

    Each entry carries the shipped verdict of its file (``local_pbe_verdicts.yaml``), or
    ``unverified`` for a file that was never verified.

    Raises
    ------
    UserError
        No PBE pseudopotential was found (Quantum ESPRESSO's data files are not installed), or
        ``dest`` cannot be created or written.
    """
    dest = Path(dest).expanduser()
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"cannot create the family folder {dest} ({exc.strerror or exc}); pass --dest a "
            "folder you can write to"
        ) from None
    if not os.access(dest, os.W_OK):
        raise UserError(f"cannot write to the family folder {dest}; pass --dest a folder you can write to")
    with tempfile.TemporaryDirectory(prefix="crystaloop-pseudos-") as tmp:
        candidates, ld1_ok, ld1_failed = _gather_candidates(Path(tmp), use_ld1, ld1_elements, jobs)
        if not candidates:
            raise UserError(
                f"no PBE pseudopotentials found in {DEBIAN_PSEUDO_DIR} or QE's examples; install "
                "them with 'apt-get install quantum-espresso' or point CRYSTALOOP_PSEUDO_DIR at SSSP"
            )
        best: dict[str, Candidate] = {}
        for cand in candidates:
            current = best.get(cand.header.element)
            if current is None or cand.rank > current.rank:
                best[cand.header.element] = cand
        entries: dict[str, PseudoEntry] = {}
        rewrapped: dict[str, int] = {}
        verdicts = local_verdicts()
        dropped: dict[str, str] = {}
        for element, cand in best.items():
            known = verdicts.get(element, {})
            verdict = known.get("verdict", "unverified") if known.get("filename") == cand.path.name else "unverified"
            if verdict == "failed" and _fails_structural_check(known) and not include_failed:
                dropped[element] = cand.path.name
                continue
            target = dest / cand.path.name
            shutil.copyfile(cand.path, target)
            count = rewrap_long_lines(target)
            if count:
                rewrapped[element] = count
            ecutwfc, ecutrho = suggested_cutoffs(cand.header)
            entries[element] = PseudoEntry(
                filename=target.name,
                md5=md5sum(target),
                ecutwfc=ecutwfc,
                ecutrho=ecutrho,
                pseudo_type=cand.header.pseudo_type,
                source=cand.source,
                verdict=verdict,
                verification=known.get("verification") if verdict != "unverified" else None,
            )
    ordered = dict(sorted(entries.items(), key=lambda kv: Element(kv[0]).Z))
    family = PseudoFamily(
        name=name, functional="PBE", cutoff_policy=CUTOFF_POLICY, pseudopotentials=ordered
    )
    family_path = dest / "family.yaml"
    family_path.write_text(
        yaml.safe_dump(family.model_dump(mode="json", exclude_none=True), sort_keys=False)
    )
    return BuildReport(
        family_path=family_path,
        elements=list(ordered),
        chosen={el: e.filename for el, e in ordered.items()},
        ld1_ok=ld1_ok,
        ld1_failed=ld1_failed,
        rewrapped=rewrapped,
        dropped=dropped,
    )
