"""The sample store (ArrayRecord shards + manifest) and the grain loader: exact round trips,
schema errors, appending, resumable iterator state, seeded shuffling, disjoint process shards
(a real 2-process run) and global placement on the 8-device mesh.

Run as a script, this file is one worker of the 2-process test (see `_worker`).
"""

import dataclasses
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from mi_jax.data.loader import Loader, LoaderConfig, LoaderError, batch_sharding, to_global
from mi_jax.data.store import SchemaError, StoreError, StoreReader, StoreWriter, done_clips

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T, H, W, C, L, S = 2, 4, 4, 4, 5, 2


def make_sample(rng, t=T, h=H, w=W, window=0):
    """One tiny window with every store field (shapes as in mi_jax.data.store)."""
    f = 1 + 4 * (t - 1)
    return dict(
        latents=rng.standard_normal((t, h, w, C), np.float32),
        ref_latent=rng.standard_normal((1, h, w, C), np.float32),
        audio_states=rng.standard_normal((f, 3, 8)).astype(np.float16),
        text_embeds=rng.standard_normal((L, 6)).astype(np.float16),
        text_mask=(np.arange(L) < 3).astype(np.int32),
        pooled=rng.standard_normal(7).astype(np.float32),
        face_mask=(rng.random((t, h, w)) > 0.5).astype(np.uint8),
        mouth_mask=(rng.random((t, h, w)) > 0.8).astype(np.uint8),
        speaker_masks=(rng.random((S, t, h, w)) > 0.5).astype(np.uint8),
        window=window,
        fps=25.0,
        truth={"mouth_open": rng.random(t).round(3).tolist(), "speaker": "a"},
    )


def write_store(directory, windows_per_clip, seed=0, shard_size=4, prefix="clip"):
    """Clips `prefix{i}` with the given window counts -> {clip_id: [samples]}."""
    rng = np.random.default_rng(seed)
    written = {}
    with StoreWriter(directory, shard_size=shard_size) as writer:
        for i, n in enumerate(windows_per_clip):
            clip = [make_sample(rng, window=w) for w in range(n)]
            writer.write_clip(f"{prefix}{i}", clip)
            written[f"{prefix}{i}"] = clip
    return written


@pytest.fixture(scope="module")
def store16(tmp_path_factory):
    """16 windows in 6 clips over several shards."""
    directory = tmp_path_factory.mktemp("store16")
    write_store(directory, [3, 2, 4, 1, 3, 3])
    return str(directory)


def test_round_trip_values_dtypes_metadata(tmp_path):
    written = write_store(tmp_path, [3, 0, 2, 4], shard_size=3)
    reader = StoreReader(tmp_path)
    expected = [(cid, s) for cid, clip in written.items() for s in clip]
    assert len(reader) == len(expected) == 9
    assert reader.clip_ids() == ["clip0", "clip1", "clip2", "clip3"]  # the empty clip counts as done
    assert reader.fields["audio_states"].shape == (5, 3, 8)
    assert reader.fields["audio_states"].dtype == np.float16
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    # shards close at the first clip boundary past shard_size: clips are never split
    assert [s["num_records"] for s in manifest["shards"]] == [3, 6]
    clone = pickle.loads(pickle.dumps(reader))  # what a grain worker receives
    for i, (cid, want) in enumerate(expected):
        for got in (reader[i], clone[i], clone.__getitems__([i])[0]):
            assert got["clip_id"] == cid and got["index"] == i
            assert got["window"] == want["window"] and got["fps"] == 25.0 and got["truth"] == want["truth"]
            for name, value in want.items():
                if isinstance(value, np.ndarray):
                    assert got[name].dtype == value.dtype, name
                    np.testing.assert_array_equal(got[name], value, err_msg=name)  # store round trip: bytes
    with StoreWriter(tmp_path / "copy") as writer:  # a read sample can be written again as is
        writer.write_clip("clip3", [reader[5]])
    copied = StoreReader(tmp_path / "copy")[0]
    assert copied["truth"] == written["clip3"][0]["truth"]
    # store round trip: bytes
    np.testing.assert_array_equal(copied["audio_states"], written["clip3"][0]["audio_states"])
    assert reader[0]["latents"].flags.writeable
    assert not StoreReader(tmp_path, writable=False)[0]["latents"].flags.writeable
    with pytest.raises(IndexError):
        reader[9]


def test_schema_errors_name_field_and_shapes(tmp_path):
    rng = np.random.default_rng(1)
    with StoreWriter(tmp_path) as writer:
        writer.write_clip("a", [make_sample(rng)])
        with pytest.raises(SchemaError, match=r"'latents' has shape \(3, 4, 4, 4\), the store's is \(2, 4, 4, 4\)"):
            writer.write_clip("b", [make_sample(rng), make_sample(rng, t=3)])
        bad = make_sample(rng)
        bad["face_mask"] = bad["face_mask"].astype(np.float32)
        with pytest.raises(SchemaError, match="'face_mask' has dtype float32, the store keeps uint8"):
            writer.write_clip("c", [bad])
        cast = make_sample(rng)
        cast["audio_states"] = cast["audio_states"].astype(np.float32)  # same kind: stored as float16
        writer.write_clip("d", [cast])
    assert done_clips(tmp_path) == {"a", "d"}  # the failed clip "b" left nothing, not even window 0
    assert StoreReader(tmp_path)[1]["audio_states"].dtype == np.float16

    rng = np.random.default_rng(2)
    with StoreWriter(tmp_path / "fresh") as writer:
        s = make_sample(rng)
        s["audio_states"] = s["audio_states"][:4]
        with pytest.raises(SchemaError, match=r"F=4 video frames but T=2 latent frames need F = 1 \+ 4\(T-1\) = 5"):
            writer.write_clip("x", [s])
        s = make_sample(rng)
        s["mouth_mask"] = s["mouth_mask"][:, :2]
        with pytest.raises(SchemaError, match=r"'mouth_mask' has h=2 .* but 'latents' has h=4"):
            writer.write_clip("x", [s])
        s = make_sample(rng)
        del s["fps"]
        with pytest.raises(SchemaError, match="sample lacks 'fps'"):
            writer.write_clip("x", [s])
        s = make_sample(rng)
        s["truth"] = {"open": np.zeros(2)}
        with pytest.raises(SchemaError, match="`truth` must be json-able"):
            writer.write_clip("x", [s])
        s = make_sample(rng)
        del s["pooled"]
        with pytest.raises(SchemaError, match=r"lacks field\(s\) \['pooled'\]"):
            writer.write_clip("x", [s])
        writer.write_clip("x", [make_sample(rng, t=3, h=6)])  # the first good window sets the shapes
    assert StoreReader(tmp_path / "fresh").fields["latents"].shape == (3, 6, 4, C)


def test_append_resume_and_crash_safety(tmp_path):
    first = write_store(tmp_path, [2, 3], prefix="a")
    shard0 = (tmp_path / "shard-00000.array_record").read_bytes()
    assert done_clips(tmp_path) == {"a0", "a1"}
    assert done_clips(tmp_path / "nothing") == set()

    rng = np.random.default_rng(5)
    with StoreWriter(tmp_path) as writer:  # a re-run: skip what is done, append the rest
        assert writer.clip_ids == {"a0", "a1"}
        with pytest.raises(StoreError, match="clip 'a1' is already in"):
            writer.write_clip("a1", [make_sample(rng)])
        with pytest.raises(StoreError, match="another StoreWriter holds"):
            StoreWriter(tmp_path)
        new = [make_sample(rng, window=w) for w in range(2)]
        writer.write_clip("b0", new)
    assert (tmp_path / "shard-00000.array_record").read_bytes() == shard0  # old shards untouched
    reader = StoreReader(tmp_path)
    assert reader.clip_ids() == ["a0", "a1", "b0"] and len(reader) == 7
    np.testing.assert_array_equal(reader[5]["latents"], new[0]["latents"])  # store round trip: bytes
    np.testing.assert_array_equal(reader[0]["latents"], first["a0"][0]["latents"])  # store round trip: bytes

    with pytest.raises(RuntimeError, match="crash"):  # a crash drops the open shard, keeps the rest
        with StoreWriter(tmp_path, shard_size=100) as writer:
            writer.write_clip("c0", [make_sample(rng)])
            raise RuntimeError("crash")
    assert done_clips(tmp_path) == {"a0", "a1", "b0"} and len(StoreReader(tmp_path)) == 7
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_state_json_round_trip_resumes_identically(store16):
    config = LoaderConfig(global_batch_size=3, seed=7, num_epochs=3)
    loader = Loader(store16, config)
    assert loader.steps_per_epoch == 5  # 16 // 3, remainder dropped
    for _ in range(4):
        next(loader)
    state = json.loads(json.dumps(loader.get_state()))
    after = [next(loader) for _ in range(6)]  # crosses into epoch 2
    rest = [b["index"].tolist() for b in loader]
    assert loader.step == 15 and len(rest) == 5

    resumed = Loader(store16, config)
    resumed.set_state(state)
    assert resumed.step == 4 and resumed.epoch == 0
    for want in after:
        got = next(resumed)
        assert got["clip_id"].tolist() == want["clip_id"].tolist() and got["truth"] == want["truth"]
        for name in ("index", "latents", "audio_states", "speaker_masks"):
            np.testing.assert_array_equal(got[name], want[name])  # resumed loader: the same stored bytes
    assert [b["index"].tolist() for b in resumed] == rest

    other = Loader(store16, LoaderConfig(global_batch_size=3, seed=8, num_epochs=3))
    with pytest.raises(LoaderError, match="seed: saved 7, now 8"):
        other.set_state(state)


def test_state_round_trip_with_worker_processes(store16):
    config = LoaderConfig(global_batch_size=4, seed=3, num_epochs=None, num_workers=2)
    with Loader(store16, config) as loader:
        for _ in range(3):
            next(loader)
        state = json.loads(json.dumps(loader.get_state()))
        after = [next(loader)["index"].tolist() for _ in range(4)]
    with Loader(store16, config) as resumed:
        resumed.set_state(state)
        assert [next(resumed)["index"].tolist() for _ in range(4)] == after
    with Loader(store16, dataclasses.replace(config, num_workers=0)) as single:
        assert [next(single)["index"].tolist() for _ in range(7)][3:] == after  # workers do not change the order


def epoch_orders(store, seed, epochs=2, shuffle=True):
    loader = Loader(store, LoaderConfig(global_batch_size=4, seed=seed, num_epochs=epochs, shuffle=shuffle))
    order = [i for batch in loader for i in batch["index"].tolist()]
    return [order[e * 16 : (e + 1) * 16] for e in range(epochs)]


def test_seeded_shuffle(store16):
    a, b, c = epoch_orders(store16, 0), epoch_orders(store16, 0), epoch_orders(store16, 1)
    assert a == b
    assert a != c
    for order in a + c:
        assert sorted(order) == list(range(16))  # every epoch is a permutation
    assert a[0] != a[1]  # and each epoch is shuffled anew
    assert c[0] != a[1]  # seed 1 is not seed 0 one epoch later
    assert epoch_orders(store16, 0, epochs=1, shuffle=False) == [list(range(16))]


def test_loader_config_errors(store16):
    with pytest.raises(LoaderError, match="not divisible by 2 processes"):
        Loader(store16, LoaderConfig(global_batch_size=3), shard_index=0, shard_count=2)
    with pytest.raises(LoaderError, match="fewer than the per-process batch 32"):
        Loader(store16, LoaderConfig(global_batch_size=32))
    with pytest.raises(StoreError, match="no sample store"):
        StoreReader(os.path.join(store16, "missing"))


def test_shards_split_unevenly_sized_store(tmp_path):
    """17 windows over 3 shards (in-process shard arguments): equal shares, disjoint, 2 dropped."""
    write_store(tmp_path, [5, 5, 7])
    seen = []
    for p in range(3):
        loader = Loader(str(tmp_path), LoaderConfig(global_batch_size=3, seed=4), shard_index=p, shard_count=3)
        got = [i for b in loader for i in b["index"].tolist()]
        assert len(got) == 5 and loader.step == 5
        seen += got
    assert len(set(seen)) == 15


def test_to_global_on_8_device_mesh(store16):
    import jax
    from jax.sharding import PartitionSpec as P

    from mi_jax.parallel.mesh import make_mesh

    assert jax.device_count() == 8
    mesh = make_mesh("data=2,fsdp=4")
    assert batch_sharding(mesh).spec == P(("data", "fsdp"))
    batch = next(Loader(store16, LoaderConfig(global_batch_size=8, seed=0)))
    placed = to_global(batch, mesh)
    assert "clip_id" not in placed and "truth" not in placed
    for name, local in batch.items():
        if name in placed:
            arr = placed[name]
            assert arr.shape == local.shape and arr.dtype == local.dtype, name
            assert arr.sharding.spec == P(("data", "fsdp")), name
            assert len(arr.addressable_shards) == 8
            for shard in arr.addressable_shards:
                assert shard.data.shape[0] == 1
                # placement copies shards
                np.testing.assert_array_equal(np.asarray(shard.data), local[shard.index], err_msg=name)
    assert placed["latents"].shape == (8, T, H, W, C)
    with pytest.raises(LoaderError, match="cannot be split over the 8 devices"):
        to_global({"x": np.zeros((4, 2), np.float32)}, mesh)


def test_two_processes_get_disjoint_shards(store16, tmp_path):
    """A real 2-process JAX run on 127.0.0.1 (gloo collectives, 2 CPU devices each)."""
    import portpicker

    port = portpicker.pick_unused_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(i), str(port), store16, str(tmp_path / f"out{i}.json")],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=90)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    out = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
    first, second = set(out[0]["indices"]), set(out[1]["indices"])
    assert len(out[0]["indices"]) == len(out[1]["indices"]) == 8
    assert not first & second
    assert first | second == set(range(16))
    for o in out:
        assert o["global_shape"] == [4, T, H, W, C]
        # the global index arrays, summed on the mesh, cover both processes' batches
        assert o["global_index_sums"] == [a + b for a, b in zip(out[0]["local_sums"], out[1]["local_sums"])]


def _worker(process_id: int, port: int, store: str, out_path: str) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", 2)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                               initialization_timeout=60)
    from mi_jax.parallel.mesh import make_mesh

    mesh = make_mesh("data=2,fsdp=2")
    loader = Loader(store, LoaderConfig(global_batch_size=4, seed=11))
    assert loader.shard_index == process_id and loader.batch_size == 2
    total = jax.jit(lambda x: x.sum())
    indices, local_sums, global_sums, shape = [], [], [], None
    for batch in loader:
        indices += batch["index"].tolist()
        placed = to_global(batch, mesh)
        shape = list(placed["latents"].shape)
        local_sums.append(int(batch["index"].sum()))
        global_sums.append(int(total(placed["index"])))
    with open(out_path, "w") as f:
        json.dump({"indices": indices, "global_shape": shape, "local_sums": local_sums,
                   "global_index_sums": global_sums}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
