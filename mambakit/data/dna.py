"""DNA for Mamba: FASTA files → nucleotide tokens → windows for pretraining and classification (paper §4.3).

    read_fasta(path)               streaming reader of FASTA / FASTA.gz: one FastaRecord per '>' record
    NucleotideTokenizer()          A C G T N + specials, one token per base pair (the paper tokenizes per bp)
    reverse_complement(ids)        the other strand, for augmentation (ids or a str)
    Genome / load_genome(path)     a file's records as uint8 token arrays, with a label (species, strain)
    GenomeWindows(genomes, l)      random windows (b, l) that never cross a record's end, optional RC augmentation

Characters (documented handling, checked per line with the line number in the error):
    A C G T                 the bases; lower case (soft-masked repeats) reads as upper case, the mask is dropped
    U                       read as T (RNA written in FASTA)
    N and IUPAC codes       R Y S W K M B D H V N (ambiguous bases) all become N: one "unknown base" token,
                            as HyenaDNA / the paper's HG38 setup keep a single N
    whitespace              ignored (inside lines and blank lines); ';' lines (old FASTA comments) skipped
    anything else           ValueError naming the file, line and character ('-' gaps included: an alignment
                            is not a genome; remove the gaps first)
A record with no sequence, sequence before the first '>' and a file with no record are ValueErrors too.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

# ----------------------------------------------------------------------------------------- characters
BASES = "ACGT"
IUPAC_AMBIGUOUS = "RYSWKMBDHVN"  # every IUPAC nucleotide code that is not a single base
_CANON = bytearray(256)  # byte → canonical upper-case base byte (A, C, G, T, N), 0 = not allowed
for _c in BASES:
    _CANON[ord(_c)] = _CANON[ord(_c.lower())] = ord(_c)
_CANON[ord("U")] = _CANON[ord("u")] = ord("T")
for _c in IUPAC_AMBIGUOUS:
    _CANON[ord(_c)] = _CANON[ord(_c.lower())] = ord("N")
_ALLOWED = bytes(i for i in range(256) if _CANON[i])
_WHITESPACE = b" \t\r\n\v\f"
# bytes.translate table: allowed bytes → canonical, every other byte → itself (rejected before translating)
_TO_CANON = bytes(_CANON[i] or i for i in range(256))


@dataclass
class FastaRecord:
    """One FASTA record: `name` is the header's first word, `description` the rest of the header line,
    `sequence` the bases, upper case, over the alphabet A C G T N (see the module docstring)."""

    name: str
    description: str
    sequence: str

    def __len__(self) -> int:
        return len(self.sequence)


def _open_binary(path: Path):
    """The file, decompressed if it starts with the gzip magic bytes (whatever its name says)."""
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def read_fasta(path: str | os.PathLike) -> Iterator[FastaRecord]:
    """Yields the records of a FASTA or gzipped FASTA file one at a time (a whole genome is one record's
    sequence; the file is never held in memory at once). Raises ValueError on the bad inputs the module
    docstring lists, naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FASTA file {str(path)!r} does not exist")
    n_records = 0
    name = description = None
    header_line = 0
    chunks: list[bytes] = []

    def finish() -> FastaRecord:
        if not chunks:
            raise ValueError(f"{path}: record {name!r} (header at line {header_line}) has no sequence "
                             f"(empty FASTA record)")
        return FastaRecord(name, description, b"".join(chunks).translate(_TO_CANON).decode("ascii"))

    try:
        with _open_binary(path) as f:
            for lineno, raw in enumerate(f, 1):
                if raw.startswith(b">"):
                    if name is not None:
                        yield finish()
                        n_records += 1
                    header = raw[1:].decode("utf-8", errors="replace").strip()
                    name, _, description = header.partition(" ")
                    if not name:
                        raise ValueError(f"{path}: line {lineno}: a '>' header without a name")
                    description, header_line, chunks = description.strip(), lineno, []
                    continue
                if raw.startswith(b";"):
                    continue
                line = raw.translate(None, _WHITESPACE)
                if not line:
                    continue
                if name is None:
                    raise ValueError(f"{path}: line {lineno}: sequence before the first '>' header "
                                     f"(not a FASTA file?)")
                bad = line.translate(None, _ALLOWED)
                if bad:
                    ch = chr(bad[0])
                    col = line.index(bad[:1]) + 1
                    what = "a gap (alignment FASTA is not supported)" if ch in "-." else "not a nucleotide code"
                    raise ValueError(f"{path}: line {lineno}, column {col}: character {ch!r} in record {name!r} "
                                     f"is {what}; allowed: A C G T U, IUPAC {IUPAC_AMBIGUOUS} (read as N), "
                                     f"either case")
                chunks.append(line)
    except (OSError, EOFError, zlib.error) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path}: cannot read FASTA data ({type(e).__name__}: {e}); a truncated or corrupt "
                         f"gzip file?") from None
    if name is None:
        raise ValueError(f"{path}: no FASTA record (no '>' header line) in the file")
    yield finish()


# ------------------------------------------------------------------------------------------ tokenizer
class NucleotideTokenizer:
    """One token per base pair: A=0, C=1, G=2, T=3, N=4, then <eos>=5, <pad>=6, <cls>=7 (vocab_size 8, a
    multiple of 8, so MambaLM pads nothing). With A..T first the complement of base id i is 3 − i, so the
    reverse complement is an index flip plus a subtraction. Text is read with the FASTA rules above."""

    tokens = ("A", "C", "G", "T", "N", "<eos>", "<pad>", "<cls>")
    eos_token_id = 5
    bos_token_id = 5
    pad_token_id = 6
    cls_token_id = 7
    n_token_id = 4
    _LUT = np.full(256, 255, dtype=np.uint8)
    for _i, _c in enumerate("ACGTN"):
        _LUT[ord(_c)] = _i

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode_array(self, seq: str | bytes) -> np.ndarray:
        """seq → uint8 ids (l,). Accepts anything read_fasta accepts (lower case, U, IUPAC codes)."""
        raw = seq.encode("ascii", errors="replace") if isinstance(seq, str) else bytes(seq)
        raw = raw.translate(None, _WHITESPACE)
        bad = raw.translate(None, _ALLOWED)
        if bad:
            raise ValueError(f"sequence contains {chr(bad[0])!r}, not a nucleotide code (A C G T U or IUPAC "
                             f"{IUPAC_AMBIGUOUS})")
        return self._LUT[np.frombuffer(raw.translate(_TO_CANON), dtype=np.uint8)]

    def encode(self, seq: str) -> list[int]:
        return self.encode_array(seq).tolist()

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        out = []
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i!r} is outside the nucleotide vocabulary [0, {self.vocab_size})")
            if i < 5 or not skip_special_tokens:
                out.append(self.tokens[i])
        return "".join(out)

    def __repr__(self) -> str:
        return "NucleotideTokenizer(ACGTN + <eos> <pad> <cls>)"


def reverse_complement(ids):
    """The reverse complement of a sequence: a str (A↔T, C↔G, N stays, order reversed), or token ids
    (np.ndarray / Tensor, reversed along the last axis; specials and N are left as they are)."""
    if isinstance(ids, str):
        return ids.translate(_RC_STR)[::-1]
    if isinstance(ids, Tensor):
        flipped = ids.flip(-1)
        return torch.where(flipped < 4, 3 - flipped, flipped)
    arr = np.asarray(ids)
    flipped = arr[..., ::-1]
    return np.where(flipped < 4, 3 - flipped, flipped).astype(arr.dtype)


_RC_STR = str.maketrans("ACGTNacgtn", "TGCANtgcan")


# --------------------------------------------------------------------------------------------- genomes
@dataclass
class Genome:
    """A genome file as token arrays: one uint8 array per record (chromosomes, plasmids, contigs), plus
    the labels the experiments use (species, strain) and the source path."""

    species: str
    strain: str
    records: list[np.ndarray]
    names: list[str]
    path: str = ""

    @property
    def n_bases(self) -> int:
        return sum(len(r) for r in self.records)

    def gc_content(self) -> float:
        counts = np.bincount(np.concatenate(self.records), minlength=8)
        return float((counts[1] + counts[2]) / max(1, counts[:4].sum()))


def load_genome(path: str | os.PathLike, species: str = "", strain: str = "",
                min_record_length: int = 0) -> Genome:
    """Reads every record of a FASTA file into token arrays (records shorter than min_record_length,
    e.g. small plasmids, are skipped; if that leaves none, a ValueError says so)."""
    tok = NucleotideTokenizer()
    records, names = [], []
    for rec in read_fasta(path):
        if len(rec) >= min_record_length:
            records.append(tok.encode_array(rec.sequence))
            names.append(rec.name)
    if not records:
        raise ValueError(f"{path}: no record of at least {min_record_length} bases")
    return Genome(species, strain or Path(path).name.split(".")[0], records, names, str(path))


class GenomeWindows:
    """Random windows of `length` bases from a set of genomes, with one integer label per genome.

    A window lies inside one record (never across a chromosome end); records are chosen with probability
    proportional to their usable length, so every base is equally likely. With rc_prob > 0 each window is
    reverse-complemented with that probability (the other strand carries the same information: the paper's
    and HyenaDNA's augmentation). `label_fn(genome_index, record_index, start, length, rc)` overrides the
    per-genome label (e.g. for position-dependent tasks); it must return an int."""

    def __init__(self, genomes: Sequence[Genome], length: int, labels: Sequence[int] | None = None,
                 rc_prob: float = 0.0, label_fn=None):
        if not genomes:
            raise ValueError("GenomeWindows needs at least one genome")
        if length < 1:
            raise ValueError(f"window length must be >= 1, got {length}")
        if not 0.0 <= rc_prob <= 1.0:
            raise ValueError(f"rc_prob must be in [0, 1], got {rc_prob}")
        self.genomes, self.length, self.rc_prob, self.label_fn = list(genomes), length, rc_prob, label_fn
        self.labels = list(labels) if labels is not None else list(range(len(genomes)))
        if len(self.labels) != len(self.genomes):
            raise ValueError(f"{len(self.labels)} labels for {len(self.genomes)} genomes")
        # every (genome, record) with at least one full window, weighted by its number of window starts
        self._index = [(g, r) for g, gen in enumerate(self.genomes) for r, rec in enumerate(gen.records)
                       if len(rec) >= length]
        if not self._index:
            longest = max(len(r) for gen in self.genomes for r in gen.records)
            raise ValueError(f"no record holds a window of {length} bases (the longest has {longest})")
        starts = np.array([len(self.genomes[g].records[r]) - length + 1 for g, r in self._index], dtype=np.float64)
        self._p = starts / starts.sum()

    def sample(self, batch_size: int, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        """(ids (b, l) int64, labels (b,) int64) drawn with `rng`."""
        picks = rng.choice(len(self._index), size=batch_size, p=self._p)
        ids = np.empty((batch_size, self.length), dtype=np.int64)
        labels = np.empty(batch_size, dtype=np.int64)
        for i, k in enumerate(picks):
            g, r = self._index[k]
            rec = self.genomes[g].records[r]
            start = int(rng.integers(0, len(rec) - self.length + 1))
            window = rec[start:start + self.length]
            rc = self.rc_prob > 0 and rng.random() < self.rc_prob
            ids[i] = reverse_complement(window) if rc else window
            labels[i] = self.label_fn(g, r, start, self.length, rc) if self.label_fn else self.labels[g]
        return torch.from_numpy(ids), torch.from_numpy(labels)

    def tiles(self, max_windows_per_genome: int | None = None) -> Iterator[tuple[int, int, int]]:
        """Deterministic non-overlapping windows (genome, record, start) for evaluation: every genome's
        records cut into consecutive windows, up to max_windows_per_genome per genome spread evenly."""
        for g, gen in enumerate(self.genomes):
            all_w = [(g, r, s) for r, rec in enumerate(gen.records)
                     for s in range(0, len(rec) - self.length + 1, self.length)]
            if max_windows_per_genome and len(all_w) > max_windows_per_genome:
                pick = np.linspace(0, len(all_w) - 1, max_windows_per_genome).round().astype(int)
                all_w = [all_w[i] for i in pick]
            yield from all_w

    def window(self, g: int, r: int, start: int, rc: bool = False) -> np.ndarray:
        w = self.genomes[g].records[r][start:start + self.length].astype(np.int64)
        return reverse_complement(w) if rc else w
