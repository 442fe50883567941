"""The corpus: listing by suffix, the deterministic split by file, skipped binary files, clear errors,
and the standard-library corpus (listed only: tokenizing its 12 MB is for the benchmark, not tests)."""

import sysconfig
from pathlib import Path

import pytest

from autopar.data import Corpus, stdlib_corpus, token_stream
from tests.data.generated import write_corpus


def test_lists_files_by_suffix_and_splits_by_path(corpus, corpus_folder):
    paths = [f.path for f in corpus.train + corpus.heldout]
    assert len(paths) == 63 and len(set(paths)) == 63  # 60 modules, README.md, blob.txt, latin1.txt
    assert "README.md" in paths and "pkg/module_001.py" in paths and "data.bin" not in paths
    assert corpus.train and corpus.heldout and not set(corpus.train) & set(corpus.heldout)
    assert 0.03 < len(corpus.heldout) / len(paths) < 0.35  # heldout_fraction = 0.15 by a path hash
    again = Corpus.from_folder(corpus_folder, heldout_fraction=0.15)
    assert again.heldout == corpus.heldout and again.fingerprint("train") == corpus.fingerprint("train")
    assert corpus.fingerprint("train") != corpus.fingerprint("heldout")
    only_py = Corpus.from_folder(corpus_folder, suffixes=(".py",), heldout_fraction=0.15)
    assert all(f.path.endswith(".py") for f in only_py.train + only_py.heldout)
    assert {f.path for f in only_py.heldout} <= {f.path for f in corpus.heldout}  # a file's split is fixed


def test_binary_and_undecodable_files_are_skipped_and_counted(corpus, tokenizer, cache_dir):
    files = {f.path: f for f in corpus.train + corpus.heldout}
    assert corpus.read(files["pkg/blob.txt"]) is None and corpus.read(files["pkg/latin1.txt"]) is None
    assert "ünïcode" in corpus.read(files["lib/module_000.py"])
    streams = [token_stream(corpus, tokenizer, split=split, cache_dir=cache_dir)
               for split in ("train", "heldout")]
    assert sum(s.num_skipped for s in streams) == 2
    assert sum(s.num_documents for s in streams) == 61
    assert all(int((s.tokens == tokenizer.eot_id).sum()) == s.num_documents for s in streams)


def test_each_split_keeps_a_file(tmp_path):
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text(f"text of {name}\n")
    tiny = Corpus.from_folder(tmp_path, heldout_fraction=0.01)
    assert len(tiny.train) == len(tiny.heldout) == 1
    assert len(Corpus.from_folder(tmp_path, heldout_fraction=0.99).train) == 1


def test_errors_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"'.*missing' does not exist: pass a folder .*stdlib_corpus"):
        Corpus.from_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"has no non-empty files ending in .*\.py.*pass suffixes="):
        Corpus.from_folder(tmp_path)
    (tmp_path / "empty.py").write_text("")
    (tmp_path / "notes.bin").write_text("not listed")
    with pytest.raises(ValueError, match="has no non-empty files"):
        Corpus.from_folder(tmp_path)
    (tmp_path / "one.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="has 1 usable file: .* at least 2 files"):
        Corpus.from_folder(tmp_path)
    with pytest.raises(ValueError, match="is a file, not a folder"):
        Corpus.from_folder(tmp_path / "one.py")
    with pytest.raises(TypeError, match=r"suffixes = '\.py' is a string"):
        Corpus.from_folder(tmp_path, suffixes=".py")
    with pytest.raises(ValueError, match="each starting with '.'"):
        Corpus.from_folder(tmp_path, suffixes=("py",))
    with pytest.raises(ValueError, match=r"heldout_fraction = 1\.5 is invalid"):
        Corpus.from_folder(tmp_path, heldout_fraction=1.5)
    with pytest.raises(ValueError, match="split = 'test' is invalid"):
        Corpus.from_folder(tmp_path, suffixes=(".py", ".bin")).files("test")


def test_hidden_and_excluded_folders_are_skipped(tmp_path):
    write_corpus(tmp_path, num_files=4)
    for hidden in (".git/config.txt", "__pycache__/x.py", "node_modules/m.js", ".hidden.py"):
        (tmp_path / hidden).parent.mkdir(exist_ok=True)
        (tmp_path / hidden).write_text("skip me\n")
    listed = Corpus.from_folder(tmp_path)
    paths = [f.path for f in listed.train + listed.heldout]
    assert len(paths) == 7 and not any("skip" in p or p.startswith((".", "__", "node")) for p in paths)


def test_stdlib_corpus_lists_the_interpreters_own_modules():
    corpus = stdlib_corpus()
    root = sysconfig.get_paths()["stdlib"]
    files = corpus.train + corpus.heldout
    assert str(corpus.root) == str(Path(root).resolve())
    paths = {f.path for f in files}
    assert {"os.py", "json/__init__.py", "asyncio/base_events.py"} <= paths
    assert all(p.endswith(".py") for p in paths)
    assert not any(part in ("test", "tests", "idle_test", "site-packages")
                   for p in paths for part in p.split("/"))
    assert len(files) > 500 and corpus.num_bytes("train") > 5e6, corpus.describe()
    assert 0 < len(corpus.heldout) < 0.05 * len(files)
    assert stdlib_corpus().heldout == corpus.heldout  # the same modules held out every time
    assert len(stdlib_corpus(include_tests=True).train) > len(corpus.train)
