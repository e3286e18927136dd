"""The streaming latent reader: schema checks, resolution choice, order, mixing, resume, caption dropout."""
import json
import os

import numpy as np
import pytest
import torch

from dataprep.synthetic import random_latent_set
from microdit.data import LatentSet, caption_dropout, latent_loader, open_latent_sets, prepare_run_tmp, to_device


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    d = tmp_path_factory.mktemp("sets")
    return (random_latent_set(d / "a", n=48, resolutions=(16, 32), seed=0),
            random_latent_set(d / "b", n=48, resolutions=(16, 32), seed=1))


def _ids(loader, max_batches=None):
    out = []
    for i, b in enumerate(loader):
        out += b["sample_id"]
        if max_batches and i + 1 >= max_batches:
            break
    return out


def test_batches_have_schema_shapes_and_are_writable(sets, tmp_path):
    for res, side in ((16, 8), (32, 16)):
        b = next(iter(latent_loader([sets[0]], res, batch_size=8, run_dir=tmp_path / f"r{res}")))
        assert b["latents"].shape == (8, 12, side, side) and b["latents"].dtype == torch.float16   # as stored
        assert b["caption"].shape == (8, 4, 8) and b["caption"].dtype == torch.float16
        b["latents"].add_(1)          # a copy, not a read-only view of the shard
        x, y = to_device(b, "cpu")    # cast where the model runs
        assert x.dtype == y.dtype == torch.float32 and torch.equal(y, b["caption"].float())
    ds = LatentSet(sets[0], 32)
    ref = np.asarray(ds._ds[3]["latents_32"], dtype=np.float32)
    assert torch.equal(ds[3]["latents"], torch.from_numpy(ref))


def test_loader_values_equal_every_column_decode(sets, tmp_path):
    """The loader decodes only its columns through a memory map: values must match streaming's own
    full decode of the same samples, for each resolution."""
    from streaming import LocalDataset
    full = LocalDataset(local=str(sets[0]))
    by_id = {full[i]["sample_id"]: full[i] for i in range(len(full))}
    for res in (16, 32):
        seen = 0
        for b in latent_loader([sets[0]], res, batch_size=8, seed=1, run_dir=tmp_path / f"v{res}"):
            for j, sid in enumerate(b["sample_id"]):
                ref = by_id[sid]
                assert torch.equal(b["latents"][j], torch.from_numpy(ref[f"latents_{res}"]))
                assert torch.equal(b["caption"][j], torch.from_numpy(ref["caption_latents"]))
                seen += 1
        assert seen == 48


def test_order_is_deterministic_per_seed(sets, tmp_path):
    a = _ids(latent_loader([sets[0]], 16, 8, seed=3, run_dir=tmp_path / "1"))
    b = _ids(latent_loader([sets[0]], 16, 8, seed=3, run_dir=tmp_path / "2"))
    c = _ids(latent_loader([sets[0]], 16, 8, seed=4, run_dir=tmp_path / "3"))
    assert a == b and sorted(a) == sorted(c) and a != c and len(set(a)) == 48


def test_resume_continues_without_overlap(sets, tmp_path):
    full = _ids(latent_loader([sets[0]], 16, 8, seed=1, run_dir=tmp_path / "full"))
    first = latent_loader([sets[0]], 16, 8, seed=1, run_dir=tmp_path / "first")
    head = _ids(first, max_batches=2)
    state = first.state_dict()
    second = latent_loader([sets[0]], 16, 8, seed=1, run_dir=tmp_path / "second")
    second.load_state_dict(json.loads(json.dumps(state)))
    assert head + _ids(second) == full


def test_loader_workers_yield_every_sample_once_with_the_same_values_and_resume(sets, tmp_path):
    """Batches stacked in 2 DataLoader worker processes (the column decoder and memory map travel to
    them): every sample once per epoch, values as without workers; a resume continues without overlap."""
    def by_id(loader):
        got = {}
        for b in loader:
            for j, sid in enumerate(b["sample_id"]):
                assert sid not in got
                got[sid] = (b["latents"][j].clone(), b["caption"][j].clone())
        return got
    plain = by_id(latent_loader([sets[0]], 16, 8, seed=2, run_dir=tmp_path / "w0"))
    workers = by_id(latent_loader([sets[0]], 16, 8, seed=2, run_dir=tmp_path / "w2", num_workers=2))
    assert sorted(plain) == sorted(workers) and len(plain) == 48
    assert all(torch.equal(plain[k][0], workers[k][0]) and torch.equal(plain[k][1], workers[k][1]) for k in plain)
    full = _ids(latent_loader([sets[0]], 16, 8, seed=5, run_dir=tmp_path / "f", num_workers=2))
    first = latent_loader([sets[0]], 16, 8, seed=5, run_dir=tmp_path / "a", num_workers=2)
    head = _ids(first, max_batches=3)
    second = latent_loader([sets[0]], 16, 8, seed=5, run_dir=tmp_path / "b", num_workers=2)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert head + _ids(second) == full


def test_sets_mix_by_proportion(sets, tmp_path):
    loader = latent_loader([sets[0], sets[1]], 16, 8, seed=0, proportions=[0.75, 0.25], run_dir=tmp_path / "mix")
    ids = []
    for b in loader:
        ids += [(float(b["caption"][i, 0, 0]), sid) for i, sid in enumerate(b["sample_id"])]
    a_caps = {float(LatentSet(sets[0], 16)[i]["caption"][0, 0]) for i in range(48)}
    from_a = sum(1 for c, _ in ids if c in a_caps)
    assert len(ids) == 96 and from_a == 72          # 96 * 0.75: proportions hold exactly with "fixed" sampling


def test_schema_disagreeing_with_shards_is_refused(sets, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(sets[0], bad)
    sch = json.loads((bad / "schema.json").read_text())
    sch["caption_dim"] = 16
    (bad / "schema.json").write_text(json.dumps(sch))
    with pytest.raises(ValueError, match="caption_latents"):
        open_latent_sets([bad])
    with pytest.raises(ValueError, match="resolutions"):
        open_latent_sets([sets[0]], resolution=64)


def test_caption_dropout_zeroes_whole_captions_at_the_rate():
    y = torch.randn(4000, 4, 8)
    g = torch.Generator().manual_seed(0)
    out = caption_dropout(y, 0.1, g)
    zero = (out.flatten(1) == 0).all(dim=1)
    kept = ~zero
    assert 0.08 < zero.float().mean() < 0.12
    assert torch.equal(out[kept], y[kept])
    assert torch.equal(out, caption_dropout(y, 0.1, torch.Generator().manual_seed(0)))


def test_run_tmp_is_private_and_stale_shared_memory_of_a_dead_run_is_unlinked(tmp_path):
    from multiprocessing import shared_memory

    from streaming.base.shared.prefix import _get_path
    run = tmp_path / "run"
    (run / "tmp").mkdir(parents=True)
    (run / "tmp" / "000999_barrier_filelock").write_text("")
    name = _get_path(987654, "locals")
    shm = shared_memory.SharedMemory(name, create=True, size=16)
    shm.close()
    (run / "tmp" / "streaming_shm.json").write_text(json.dumps({"pid": 2 ** 22 + 12345, "prefix": 987654}))
    tmp = prepare_run_tmp(run)
    assert tmp == run / "tmp" and tmp.is_dir() and not (tmp / "000999_barrier_filelock").exists()
    with pytest.raises(FileNotFoundError):
        shared_memory.SharedMemory(name, create=False)
    loader = latent_loader([random_latent_set(tmp_path / "s", n=8)], 16, 4, run_dir=run)
    next(iter(loader))
    assert any(p.name.endswith("_filelock") for p in tmp.iterdir())
    assert os.environ.get("TMPDIR") != str(tmp)


def test_closing_a_loader_releases_its_shared_memory(sets, tmp_path):
    """streaming keeps every shared-memory block of a dataset open until the process exits, and each new
    dataset opens the blocks of every live one while it looks for a free name: a process that trains stage
    after stage (a test session, a worker running four stages) ran out of file descriptors. Closed loaders
    give their blocks back at once."""
    from microdit.data import close_loader

    def descriptors():
        return len(os.listdir("/proc/self/fd"))

    def blocks(loader):
        prefix = f"{int(loader.dataset._shm_prefix_int):06d}_"
        return [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]
    before = descriptors()
    kept = []
    for i in range(12):
        loader = latent_loader([sets[0]], 16, batch_size=8, run_dir=tmp_path / f"r{i}")
        next(iter(loader))
        assert len(blocks(loader)) >= 5
        close_loader(loader)
        assert blocks(loader) == []
        kept.append(loader)              # still referenced, as a finished stage's trainer keeps it
    assert descriptors() - before < 2 * 12, descriptors() - before     # ~20 per loader without the release
