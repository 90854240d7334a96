"""hpcdd.run refuses bad input before any training: one line naming the problem, exit status 2,
on every rank, nothing created or changed in the run directory. A corpus of user mistakes."""

from __future__ import annotations

import json
import os
import shutil
import tomllib

import h5py
import numpy as np
import pytest

from tests.helpers import env_for_tests, prepare, run_python

pytestmark = [pytest.mark.mpi]


def hpcdd_run(*args, ranks=None):
    return run_python(["-m", "hpcdd.run", *map(str, args)], ranks=ranks, timeout=180)


def snapshot(path):
    if not os.path.exists(path):
        return None
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            st = os.stat(p)
            out[os.path.relpath(p, path)] = (st.st_size, st.st_mtime_ns, open(p, "rb").read())
    return out


@pytest.fixture(scope="module")
def corpus(small_data, tmp_path_factory, fashion_dir):
    """Data directories with one defect each, and an existing run to resume."""
    base = tmp_path_factory.mktemp("corpus")

    def copy(name):
        dst = base / name
        shutil.copytree(small_data, dst)
        return dst

    d = {"good": small_data}
    d["missing_shard"] = copy("missing_shard")
    os.unlink(d["missing_shard"] / "sub_003.h5")
    d["truncated"] = copy("truncated")
    with open(d["truncated"] / "sub_001.h5", "r+b") as f:
        f.truncate(os.path.getsize(d["truncated"] / "sub_001.h5") // 2)
    d["not_hdf5"] = copy("not_hdf5")
    (d["not_hdf5"] / "sub_000.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    other = base / "other"
    prepare(fashion_dir, other, train=2000, test=1000, extra=("--seed", "5"))
    d["mixed"] = copy("mixed")
    shutil.copy(other / "sub_002.h5", d["mixed"] / "sub_002.h5")
    d["labels"] = copy("labels")
    with h5py.File(d["labels"] / "sub_001.h5", "r+") as f:
        f["train"]["y"][5] = 17
    d["shifted"] = copy("shifted")  # labels of one shard shifted by one class, written through HDF5
    with h5py.File(d["shifted"] / "sub_002.h5", "r+") as f:
        f["train"]["y"][...] = (f["train"]["y"][:] + 1) % 10
    d["edited"] = copy("edited")  # a digit of the manifest changed: still a valid manifest, another dataset
    text = (d["edited"] / "manifest.json").read_text()
    (d["edited"] / "manifest.json").write_text(text.replace('"std": [\n  0.', '"std": [\n  1.', 1))
    assert (d["edited"] / "manifest.json").read_text() != text
    d["grid"] = copy("grid")
    with h5py.File(d["grid"] / "sub_000.h5", "r+") as f:
        f.attrs["grid"] = [4, 4]
    d["manifest"] = copy("manifest")
    (d["manifest"] / "manifest.json").write_text("{ truncated")
    good_manifest = json.load(open(os.path.join(small_data, "manifest.json")))
    for name, key, value in (("std0", "std", [0.0]), ("mean_nan", "mean", [float("nan")]), ("grid_text", "grid", "2x2"),
                             ("scale_text", "scale", "1/255"), ("classes_one", "classes", ["all"])):
        d[name] = copy(name)
        (d[name] / "manifest.json").write_text(json.dumps(dict(good_manifest, **{key: value})))
    from data_prep.sources import read_idx

    x = read_idx(f"{fashion_dir}/train-images-idx3-ubyte.gz")[:300].astype(np.float32) / 255
    y = read_idx(f"{fashion_dir}/train-labels-idx1-ubyte.gz")[:300]
    np.savez(base / "float.npz", x=x, y=y)
    from data_prep.cli import run

    run(["npz", str(base / "float.npz"), str(base / "nan"), "--grid", "2x2", "--quiet"])
    with h5py.File(base / "nan" / "sub_002.h5", "r+") as f:
        f["train"]["x"][3, 0, 2, 2] = np.inf
    d["nan"] = base / "nan"
    run(["npz", str(base / "float.npz"), str(base / "grid3"), "--grid", "3x3", "--quiet"])  # columns 9, 9, 10 of 28
    d["grid3"] = base / "grid3"
    # an existing run (configuration written, nothing trained) to resume
    run_dir = base / "existing_run"
    proc = hpcdd_run("--data", small_data, "--out", run_dir, "--print-config")
    run_dir.mkdir()
    cfg = tomllib.loads(proc.stdout)
    cfg["meta"] = {"prep_id": json.load(open(os.path.join(small_data, "manifest.json")))["prep_id"]}
    (run_dir / "config.json").write_text(json.dumps(cfg))
    (run_dir / "state.json").write_text(json.dumps({"phases": {}}))
    d["run"] = run_dir
    d["userdir"] = base / "userdir"
    d["userdir"].mkdir()
    (d["userdir"] / "thesis.tex").write_text("years of work")
    d["copied"] = base / "proj"  # a user's project that merely holds a copy of a run's config.json and state.json
    (d["copied"] / "src").mkdir(parents=True)
    (d["copied"] / "src" / "notes.txt").write_text("my notes")
    (d["copied"] / "config.json").write_text(json.dumps(dict(cfg, meta={"tool": "hpcdd 0.1.0"})))
    (d["copied"] / "state.json").write_text(json.dumps({"phases": {}}))
    d["config_only"] = base / "config_only"
    d["config_only"].mkdir()
    shutil.copy(d["copied"] / "config.json", d["config_only"] / "config.json")
    d["data_parent"] = base / "data_parent"
    shutil.copytree(small_data, d["data_parent"] / "data")
    run_bad = base / "run_on_truncated_data"
    run_bad.mkdir()
    (run_bad / "config.json").write_text(json.dumps(dict(cfg, data=str(d["truncated"]), out=str(run_bad))))
    (run_bad / "state.json").write_text(json.dumps({"phases": {"local": {"done": True}}}))
    d["run_bad"] = run_bad
    bad_toml = base / "bad.toml"
    bad_toml.write_text("[local]\nepochs = 2\nlearning_rate = 0.1\n")
    d["bad_toml"] = bad_toml
    typed_toml = base / "typed.toml"
    typed_toml.write_text("[model]\nwidths = 16\n")
    d["typed_toml"] = typed_toml
    broken_toml = base / "broken.toml"
    broken_toml.write_text("[local\nepochs = 2\n")
    d["broken_toml"] = broken_toml
    return d


CASES = [
    # (name, args (with {good}, {run}, {new}, ... placeholders), expected fragment, ranks)
    ("unknown key", ["--set", "local.epoch=3"], "did you mean 'local.epochs'", None),
    ("unknown top-level key", ["--set", "lr=0.1"], "unknown config key 'lr'", None),
    ("wrong type", ["--set", "local.epochs=three"], "local.epochs = 'three': expected an integer", None),
    ("infinite learning rate", ["--set", "local.lr=inf"], "local.lr = 'inf': expected a finite number", None),
    ("dnn optimizer", ["--set", "dnn.optimizer=rmsprop"], "dnn.optimizer = 'rmsprop': expected sgd, adam or adamw", None),
    ("zero epochs", ["--epochs", "0"], "argument --epochs: 0: expected a positive integer", None),
    ("zero batch size", ["--set", "local.batch_size=0"], "expected a positive batch size", None),
    ("negative learning rate", ["--set", "global.lr=-0.1"], "expected a positive learning rate", None),
    ("unknown family", ["--set", "model.family=alexnet"], "model.family = 'alexnet'", None),
    ("performance switch", ["--set", "performance.compile=yes"],
     "performance.compile = 'yes': expected \"auto\", \"on\" or \"off\"", None),
    ("fusion switch", ["--set", "performance.fuse_local=always"],
     "performance.fuse_local = 'always': expected \"auto\", \"on\" or \"off\"", None),
    ("autocast type", ["--set", "performance.autocast=fp16"], "performance.autocast = 'fp16': expected \"off\" or \"bf16\"",
     None),
    ("unknown phase", ["--phases", "local,everything"], "unknown phase 'everything'", None),
    ("bad signal", ["--set", "preemption.signals=SIGKILL"], "not a signal that can be caught", None),
    ("class count", ["--set", "num_classes=7"], "num_classes = 7 but", 2),
    ("shift without margin", ["--set", "local.augment_shift=2"], "needs shards stored with --margin >= 2", None),
    ("unknown augmentation", ["--set", "local.augment_mirror=true"],
     "the augmentations are augment_shift, augment_flip, of local, coherent.scratch, coherent.transfer, global", None),
    ("flip on a grid that is not mirror-symmetric", ["--data", "{grid3}", "--set", "coherent.transfer.augment_flip=1"],
     "coherent.transfer.augment_flip needs a grid whose boxes mirror each other left-right, but in {grid3} "
     "subdomain 0 spans columns 0..8 but its mirror 2 spans 18..27 of 28", 3),
    ("transfer without local", ["--phases", "coherent"], "needs the local and aggregate phases", None),
    ("aggregate without local", ["--phases", "aggregate"], "needs the local phase", None),
    ("unknown option", ["--bogus"], "unrecognized arguments: --bogus", None),
    ("unknown option on 4 ranks", ["--bogus"], "unrecognized arguments: --bogus", 4),  # said once, by rank 0
    ("no cuda", ["--device", "cuda"], "device 'cuda' requested but no CUDA device", 2),
    ("too many ranks", [], "6 ranks fit neither rule for 4 subdomains", 6),
    ("config file key", ["--config", "{bad_toml}"], "bad.toml: unknown config key 'local.learning_rate'", None),
    ("config file type", ["--config", "{typed_toml}"], "model.widths = 16: expected a list of int", None),
    ("config file syntax", ["--config", "{broken_toml}"], "invalid TOML", None),
    ("missing data", ["--data", "{new}/nowhere"], "no such directory", None),
    ("missing shard", ["--data", "{missing_shard}"], "sub_003.h5: missing shard", 2),
    ("truncated shard", ["--data", "{truncated}"], "sub_001.h5", 2),
    ("not hdf5", ["--data", "{not_hdf5}"], "sub_000.h5: not a readable HDF5 file", None),
    ("shards of two preparations", ["--data", "{mixed}"], "different data_prep runs", 2),
    ("labels out of range", ["--data", "{labels}"], "train labels outside 0..9", 2),
    ("labels of one shard shifted", ["--data", "{shifted}"], "sub_002.h5: train labels differ from the manifest's", 2),
    ("manifest edited", ["--data", "{edited}"], "manifest.json: edited after data_prep", 2),
    ("grid mismatch", ["--data", "{grid}"], "attribute grid is [4, 4] but the manifest says [2, 2]", None),
    ("corrupt manifest", ["--data", "{manifest}"], "manifest.json: corrupt JSON", None),
    ("manifest zero std", ["--data", "{std0}"], "manifest.json: std = [0.0]: expected a list of positive finite", 2),
    ("manifest NaN mean", ["--data", "{mean_nan}"], "manifest.json: mean = [NaN]: expected a list of finite numbers", 2),
    ("manifest grid of wrong type", ["--data", "{grid_text}"], 'manifest.json: grid = "2x2": expected 2 or 3', 2),
    ("manifest scale of wrong type", ["--data", "{scale_text}"], 'manifest.json: scale = "1/255": expected a positive', 2),
    ("manifest of one class", ["--data", "{classes_one}"], 'manifest.json: classes = ["all"]: expected a list of', 2),
    ("inf pixels", ["--data", "{nan}"], "contains NaN or Inf pixels", 2),
    ("run exists", ["--out", "{run}"], "already exists", 2),
    ("force on a user folder", ["--out", "{userdir}", "--force"], "--force: not an hpcdd run directory", 2),
    ("force on a folder with a copied config", ["--out", "{copied}", "--force"],
     "--force: {copied} holds src, which hpcdd-run did not write; nothing was deleted", 2),
    ("force on a folder with only a config", ["--out", "{config_only}", "--force"],
     "--force: not an hpcdd run directory", None),
    ("force on the data directory", ["--out", "{good}", "--force"], "is or holds the data directory", 2),
    ("force on a parent of the data", ["--data", "{data_parent}/data", "--out", "{data_parent}", "--force"],
     "is or holds the data directory", None),
    ("out not writable", ["--out", "/proc/hpcdd-run"], "cannot write in /proc", None),
    ("resume with other settings", ["--resume", "{run}", "--set", "local.epochs=9"], "--resume takes its configuration", None),
    ("resume of nothing", ["--resume", "{new}/never"], "no {new}/never/config.json", None),
    ("resume on corrupt data", ["--resume", "{run_bad}"], "sub_001.h5", 2),
]


@pytest.mark.parametrize("name,args,needle,ranks", CASES, ids=[c[0] for c in CASES])
def test_bad_input(corpus, tmp_path, name, args, needle, ranks):
    paths = {k: str(v) for k, v in corpus.items()} | {"new": str(tmp_path)}
    args = [a.format(**paths) for a in args]
    needle = needle.format(**paths)
    if "--data" not in args and "--resume" not in args:
        args = ["--data", paths["good"]] + args
    if "--out" not in args and "--resume" not in args:
        args = ["--out", str(tmp_path / "run")] + args
    kept = ("run", "run_bad", "userdir", "data_parent", "good", "copied", "config_only")
    before = [snapshot(corpus[k]) for k in kept]
    proc = hpcdd_run(*args, "--threads", "1", ranks=ranks)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{name}: {proc.stderr[-3000:]}"
    assert needle in lines[0], lines[0]
    assert not (tmp_path / "run").exists()
    assert [snapshot(corpus[k]) for k in kept] == before


def test_disk_too_full_is_refused(small_data, tmp_path, monkeypatch):
    import shutil as sh

    from hpcdd.config import build_config
    from hpcdd.manifest import load_manifest
    from hpcdd.errors import UserError
    from hpcdd.runner import check_disk

    cfg = build_config({}, {"data": small_data, "out": str(tmp_path / "run")})
    usage = sh.disk_usage(tmp_path)
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage._replace(free=10 << 20))
    with pytest.raises(UserError, match="MB free on its file system"):
        check_disk(cfg, load_manifest(small_data))


def test_compile_on_without_a_compiler_is_one_line(small_data, tmp_path):
    """performance.compile = "on" where no C++ compiler is on PATH: refused before training, exit 2."""

    env = env_for_tests(PATH=str(tmp_path), CXX="no-such-c++")
    proc = run_python(["-m", "hpcdd.run", "--data", small_data, "--out", str(tmp_path / "run"), "--threads", "1",
                       "--set", "performance.compile=on"], env=env)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith('error: performance.compile = "on": no C++ compiler found'), lines[0]
    assert not (tmp_path / "run").exists()


def test_help_needs_no_mpi():
    proc = run_python(["-c", "import sys; sys.modules['mpi4py'] = None; from hpcdd.run import main; main(['--help'])"])
    assert proc.returncode == 0 and "--resume" in proc.stdout
