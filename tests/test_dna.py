"""mambakit.data.dna: FASTA reading (plain and gzip, IUPAC/lower-case handling, bad files), the nucleotide
tokenizer, reverse complement and genome windows. Small synthetic FASTA files written to tmp_path."""

import gzip

import numpy as np
import pytest
import torch

from mambakit.config import MambaConfig
from mambakit.data.dna import (GenomeWindows, NucleotideTokenizer, load_genome, read_fasta,
                               reverse_complement)
from mambakit.model import MambaLM


def write(path, text, gz=False):
    data = text.encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_read_fasta_records_case_iupac(tmp_path, gz):
    p = write(tmp_path / ("g.fa.gz" if gz else "g.fa"),
              ">chr1 first one\nACGTacgt\nNNry\n\n>chr2\n; old comment\nuuAA \n", gz)
    recs = list(read_fasta(p))
    assert [r.name for r in recs] == ["chr1", "chr2"]
    assert recs[0].description == "first one"
    assert recs[0].sequence == "ACGTACGTNNNN"  # lower case → upper, R/Y → N
    assert recs[1].sequence == "TTAA"  # U → T, spaces ignored


def test_read_fasta_gzip_detected_by_content(tmp_path):
    p = write(tmp_path / "no_suffix.fa", ">x\nACGT\n", gz=True)
    assert next(read_fasta(p)).sequence == "ACGT"


@pytest.mark.parametrize("text, match", [
    (">a\n>b\nACGT\n", r"record 'a' .*no sequence"),
    (">a\nACGT\n>b\n", r"record 'b' .*no sequence"),
    ("ACGT\n>a\nAC\n", "before the first '>'"),
    (">a\nAC-GT\n", r"line 2, column 3: character '-'.*gap"),
    (">a\nACXGT\n", r"character 'X'.*not a nucleotide"),
    ("", "no FASTA record"),
    (">\nACGT\n", "without a name"),
])
def test_read_fasta_bad_input(tmp_path, text, match):
    p = write(tmp_path / "bad.fa", text)
    with pytest.raises(ValueError, match=match):
        list(read_fasta(p))


def test_read_fasta_truncated_gzip(tmp_path):
    full = gzip.compress((">a\n" + "ACGT" * 5000 + "\n").encode())
    p = tmp_path / "cut.fa.gz"
    p.write_bytes(full[: len(full) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt gzip"):
        list(read_fasta(p))
    with pytest.raises(FileNotFoundError):
        list(read_fasta(tmp_path / "missing.fa"))


def test_tokenizer_round_trip_and_model_vocab():
    tok = NucleotideTokenizer()
    ids = tok.encode("ACGTNacgtRY")
    assert ids == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 4]
    assert tok.decode(ids) == "ACGTNACGTNN"
    assert tok.decode([0, 5, 7], skip_special_tokens=False) == "A<eos><cls>"
    with pytest.raises(ValueError, match="not a nucleotide"):
        tok.encode("ACGZ")
    with pytest.raises(ValueError, match="outside the nucleotide vocabulary"):
        tok.decode([8])
    # the vocabulary fits MambaLM without padding and its ids are accepted
    cfg = MambaConfig(d_model=16, n_layer=1, vocab_size=tok.vocab_size)
    assert cfg.padded_vocab_size == tok.vocab_size == 8
    out = MambaLM(cfg)(torch.tensor([ids]))
    assert out.logits.shape == (1, len(ids), 8)


def test_reverse_complement_forms_agree():
    tok = NucleotideTokenizer()
    s = "AACGTN"
    assert reverse_complement(s) == "NACGTT"
    ids = tok.encode_array(s)
    rc_np = reverse_complement(ids)
    assert tok.decode(rc_np) == "NACGTT"
    rc_t = reverse_complement(torch.from_numpy(np.stack([ids, ids]).astype(np.int64)))
    assert torch.equal(rc_t[0], torch.from_numpy(rc_np.astype(np.int64)))
    assert np.array_equal(reverse_complement(reverse_complement(ids)), ids)  # an involution
    # specials are left as they are
    assert reverse_complement(torch.tensor([0, 5, 7])).tolist() == [7, 5, 3]


def test_genome_windows_inside_records_with_rc(tmp_path):
    rng = np.random.default_rng(0)
    a = "".join(rng.choice(list("ACGT"), 300))
    p1 = write(tmp_path / "s1.fa", f">r1\n{a}\n>r2\nACGTACGTAC\n")  # r2 is shorter than the window
    p2 = write(tmp_path / "s2.fa.gz", ">q\n" + "GC" * 100 + "\n", gz=True)
    g1, g2 = load_genome(p1, "sp1"), load_genome(p2, "sp2")
    assert g1.strain == "s1" and g1.n_bases == 310 and g2.gc_content() == 1.0
    w = GenomeWindows([g1, g2], 50, labels=[0, 1], rc_prob=0.5)
    ids, labels = w.sample(64, np.random.default_rng(1))
    assert ids.shape == (64, 50) and labels.shape == (64,)
    full = np.frombuffer(a.encode(), dtype=np.uint8)
    for row, lab in zip(ids.numpy(), labels.numpy()):
        if lab == 1:
            assert set(row.tolist()) <= {1, 2}
        else:  # the window (or its reverse complement) is a substring of record r1
            s = NucleotideTokenizer().decode(row)
            assert s in a or reverse_complement(s) in a
    assert full.size == 300
    tiles = list(w.tiles())
    assert all(start + 50 <= len(g1.records[r] if g == 0 else g2.records[r]) for g, r, start in tiles)
    with pytest.raises(ValueError, match="no record holds a window of 1000"):
        GenomeWindows([g1], 1000)
