"""The soft-target store: round trips, fingerprints, integrity, resume, training from it, memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from stillroom import StillroomError
from stillroom.data import make_loader
from stillroom.losses import soft_target_loss
from stillroom.losses.topk import topk_soft_target_loss, topk_targets_from_logits
from stillroom.store import (
    SoftTargetStore,
    StoreTeacher,
    cache_teacher,
    dataset_fingerprint,
    teacher_fingerprint,
)
from stillroom.train import distill

ROOT = Path(__file__).parent.parent


@pytest.fixture
def teacher(make_mlp: Callable[..., nn.Module]) -> nn.Module:
    return make_mlp(hidden=[32], seed=1).eval()


def reference_outputs(teacher: nn.Module, inputs: torch.Tensor, batch: int) -> torch.Tensor:
    """The teacher's outputs computed in the same batches as the store (bit-identical on CPU)."""
    with torch.inference_mode():
        return torch.cat([teacher(inputs[i : i + batch]) for i in range(0, len(inputs), batch)])


def shard_bytes(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((store / "shards").glob("*.npy"))}


class CountCalls:
    """A forward pre-hook counting teacher calls; raises (or SIGKILLs) at call `stop_at`."""

    def __init__(self, module: nn.Module, stop_at: int | None = None) -> None:
        self.calls, self.stop_at = 0, stop_at
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module: nn.Module, inputs: tuple) -> None:
        self.calls += 1
        if self.stop_at is not None and self.calls == self.stop_at:
            raise KeyboardInterrupt("simulated crash")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_dense_round_trip(tmp_path: Path, digits, teacher: nn.Module, precision: str) -> None:
    inputs = digits.train.inputs
    manifest = cache_teacher(
        teacher,
        digits.train,
        tmp_path / "store",
        precision=precision,
        features=["net.2"],
        shard_size=48,
        batch_size=48,
        progress=False,
    )
    expected = reference_outputs(teacher, inputs, 48)
    hidden = reference_outputs(teacher.net[:3], inputs, 48)
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(0))
    with SoftTargetStore.open(tmp_path / "store") as store:
        logits, features = store.logits(order), store.features("net.2", order)
    if precision == "fp32":
        assert torch.equal(logits, expected[order]) and torch.equal(features, hidden[order])
    else:
        torch.testing.assert_close(logits, expected[order], rtol=1e-3, atol=1e-3)
        assert torch.equal(logits, expected[order].half().float())
    dtype = "float32" if precision == "fp32" else "float16"
    assert manifest.num_shards == 4 and [s["count"] for s in manifest.shards] == [48, 48, 48, 16]
    assert manifest.fields["logits"] == {"dtype": dtype, "shape": [10]}
    assert manifest.fields["feature.net.2"] == {"dtype": dtype, "shape": [32]}
    itemsize = 4 if precision == "fp32" else 2
    assert manifest.bytes_per_sample == (10 + 32) * itemsize + 8  # + the input fingerprint
    saved = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert saved["complete"] and saved["teacher"] == teacher_fingerprint(teacher)
    assert saved["dataset"] == dataset_fingerprint(digits.train)
    assert saved["dataset"]["count"] == 160 and saved["dataset"]["input_shape"] == [1, 8, 8]
    assert saved["output_shape"] == [10] and saved["precision"] == precision
    assert saved["top_k"] is None and saved["command"].startswith("python")


@pytest.mark.parametrize(("precision", "pack"), [("fp32", False), ("q8", True)])
def test_topk_round_trip(
    tmp_path: Path, digits, teacher: nn.Module, precision: str, pack: bool
) -> None:
    manifest = cache_teacher(
        teacher,
        digits.train,
        tmp_path / "store",
        top_k=4,
        precision=precision,
        pack_indices=pack,
        shard_size=64,
        batch_size=64,
        progress=False,
    )
    expected = topk_targets_from_logits(reference_outputs(teacher, digits.train.inputs, 64), 4, 1)
    ids = torch.tensor([5, 150, 0, 77, 64])
    got = StoreTeacher(tmp_path / "store")(digits.train.inputs[ids], ids)
    assert got.indices.dtype == torch.int64 and got.indices.shape == (5, 4)
    # Elias-Fano keeps ids sorted; compare as sets of (id, log-prob)
    want_ids, order = expected.indices[ids].sort(dim=1)
    got_ids, got_order = got.indices.sort(dim=1)
    assert torch.equal(got_ids, want_ids)
    tolerance = 1e-6 if precision == "fp32" else 0.05
    torch.testing.assert_close(
        got.logprobs.gather(1, got_order),
        expected.logprobs[ids].gather(1, order),
        atol=tolerance,
        rtol=0,
    )
    torch.testing.assert_close(got.tail_mass, expected.tail_mass[ids], rtol=1e-2, atol=1e-6)
    assert manifest.kind == "topk" and manifest.top_k == 4
    assert manifest.fields["topk_indices"]["dtype"] == "uint8"
    assert manifest.fidelity["k"] == 4 and manifest.fidelity["positions"] == 160
    assert [row["k"] for row in manifest.fidelity["by_k"]] == [1, 2, 4, 8]


def test_fingerprint_mismatch_names_what_differs(tmp_path: Path, digits, teacher, make_mlp) -> None:
    cache_teacher(teacher, digits.train, tmp_path / "store", progress=False)
    StoreTeacher(tmp_path / "store", teacher=teacher, data=digits.train)  # the right ones pass
    other_teacher = make_mlp(hidden=[32], seed=2)
    with pytest.raises(StillroomError, match="by a different teacher") as err:
        StoreTeacher(tmp_path / "store", teacher=other_teacher, data=digits.train)
    assert "dataset" not in str(err.value)
    with pytest.raises(
        StillroomError, match=r"on a different dataset \(count 160 in the store vs 64"
    ):
        StoreTeacher(tmp_path / "store", teacher=teacher, data=digits.val)
    shifted = digits.train.inputs.clone()
    shifted[0] += 0.5
    with pytest.raises(StillroomError, match=r"different dataset.*sample_sha256") as err:
        StoreTeacher(tmp_path / "store", teacher=teacher, data=shifted)
    assert "teacher" not in str(err.value).split("computed")[1].split(";")[0]
    with pytest.raises(StillroomError, match=r"different teacher.* and on a different dataset"):
        StoreTeacher(tmp_path / "store", teacher=other_teacher, data=digits.val)


def test_corrupted_shard_is_named_and_never_read(tmp_path: Path, digits, teacher) -> None:
    cache_teacher(teacher, digits.train, tmp_path / "store", shard_size=64, progress=False)
    victim = tmp_path / "store" / "shards" / "00001.logits.npy"
    data = bytearray(victim.read_bytes())
    data[-7] ^= 0xFF  # one flipped byte in a logit of shard 1
    victim.write_bytes(bytes(data))
    store = SoftTargetStore.open(tmp_path / "store")  # sizes match: opening is fine
    store.logits([0, 1, 2])  # shard 0 is intact
    with pytest.raises(StillroomError, match=r"shards/00001\.logits\.npy \(shard 1\) is corrupted"):
        store.logits([70])
    with pytest.raises(StillroomError, match=r"00001.logits.npy"):
        store.verify()
    with pytest.raises(StillroomError, match="is corrupted"):
        SoftTargetStore.open(tmp_path / "store", verify=True)
    # what the message advises: --resume recomputes the damaged shard, and only that one
    counter = CountCalls(teacher)
    cache_teacher(teacher, digits.train, tmp_path / "store", resume=True, progress=False)
    assert counter.calls == 1 + 1  # probe + shard 1 (64 samples, one batch)
    SoftTargetStore.open(tmp_path / "store", verify=True).logits([70])


def test_truncated_shard_is_named_when_opening(tmp_path: Path, digits, teacher) -> None:
    cache_teacher(teacher, digits.train, tmp_path / "store", shard_size=64, progress=False)
    victim = tmp_path / "store" / "shards" / "00002.input_fingerprint.npy"
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(
        StillroomError, match=r"00002\.input_fingerprint\.npy \(shard 2\) is truncated"
    ):
        SoftTargetStore.open(tmp_path / "store")
    victim.unlink()
    with pytest.raises(StillroomError, match="is missing"):
        SoftTargetStore.open(tmp_path / "store")


def test_resume_after_a_crash_recomputes_only_unfinished_shards(
    tmp_path: Path, digits, teacher
) -> None:
    options = {"shard_size": 48, "batch_size": 16, "progress": False}
    cache_teacher(teacher, digits.train, tmp_path / "reference", **options)
    # 1 probe + 3 batches per full shard: crash during shard 2 (calls 8..10), after shards 0 and 1
    crash = CountCalls(teacher, stop_at=9)
    with pytest.raises(KeyboardInterrupt):
        cache_teacher(teacher, digits.train, tmp_path / "store", **options)
    crash.handle.remove()
    with pytest.raises(StillroomError, match=r"is incomplete \(2 of 4 shards written\)"):
        SoftTargetStore.open(tmp_path / "store")
    with pytest.raises(StillroomError, match="already exists; pass --resume"):
        cache_teacher(teacher, digits.train, tmp_path / "store", **options)
    counter = CountCalls(teacher)
    cache_teacher(teacher, digits.train, tmp_path / "store", resume=True, **options)
    assert counter.calls == 1 + 3 + 1  # probe, shard 2 (48 samples), shard 3 (16 samples)
    assert shard_bytes(tmp_path / "store") == shard_bytes(tmp_path / "reference")
    # a finished store resumed again computes nothing
    counter.calls = 0
    cache_teacher(teacher, digits.train, tmp_path / "store", resume=True, **options)
    assert counter.calls == 1


KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys, torch
    from stillroom.models import build_model
    from stillroom.store import cache_teacher
    torch.manual_seed(0)
    teacher = build_model({"kind": "mlp", "hidden": [32]}, (1, 8, 8), 10)
    inputs = torch.randn(200, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    calls = []
    def kill(module, args):
        calls.append(1)
        if len(calls) == 7:  # probe, shards 0 and 1 (2 batches each), then mid-way through shard 2
            os.kill(os.getpid(), signal.SIGKILL)
    teacher.register_forward_pre_hook(kill)
    cache_teacher(teacher, inputs, sys.argv[1], shard_size=40, batch_size=20, progress=False)
    """
)


def test_resume_after_kill_9(tmp_path: Path) -> None:
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(tmp_path / "store")],
        capture_output=True,
        timeout=120,
    )
    assert killed.returncode == -9, killed.stderr.decode()
    torch.manual_seed(0)
    from stillroom.models import build_model

    teacher = build_model({"kind": "mlp", "hidden": [32]}, (1, 8, 8), 10)
    inputs = torch.randn(200, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    options = {"shard_size": 40, "batch_size": 20, "progress": False}
    counter = CountCalls(teacher)
    cache_teacher(teacher, inputs, tmp_path / "store", resume=True, **options)
    assert counter.calls == 1 + 3 * 2  # probe, then shards 2, 3 and 4 only
    counter.handle.remove()
    cache_teacher(teacher, inputs, tmp_path / "reference", **options)
    assert shard_bytes(tmp_path / "store") == shard_bytes(tmp_path / "reference")
    assert not list((tmp_path / "store" / "shards").glob(".*tmp*"))


def test_resume_refuses_other_settings_or_teacher(
    tmp_path: Path, digits, teacher, make_mlp
) -> None:
    cache_teacher(teacher, digits.train, tmp_path / "store", progress=False)
    with pytest.raises(
        StillroomError, match=r"settings differ.*precision fp16 in the store vs fp32"
    ):
        cache_teacher(teacher, digits.train, tmp_path / "store", precision="fp32", resume=True)
    with pytest.raises(StillroomError, match="the teacher differs"):
        cache_teacher(make_mlp(hidden=[32], seed=3), digits.train, tmp_path / "store", resume=True)


def test_force_replaces_only_a_store(tmp_path: Path, digits, teacher) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    with pytest.raises(StillroomError, match="--force only replaces a stillroom store"):
        cache_teacher(teacher, digits.train, precious, force=True, progress=False)
    assert (precious / "notes.txt").read_text() == "keep"
    cache_teacher(teacher, digits.train, tmp_path / "store", progress=False)
    cache_teacher(
        teacher, digits.train, tmp_path / "store", precision="fp32", force=True, progress=False
    )
    assert SoftTargetStore.open(tmp_path / "store").manifest.precision == "fp32"


def test_training_from_the_store_equals_online_distillation(
    tmp_path: Path, digits, teacher, make_mlp
) -> None:
    cache_teacher(teacher, digits.train, tmp_path / "store", precision="fp32", progress=False)
    options = {"alpha": 0.9, "temperature": 4.0, "epochs": 2, "progress": False, "seed": 3}
    online = distill(
        teacher,
        make_mlp(hidden=[8], seed=5),
        make_loader(digits.train, 32, shuffle=True),
        **options,
    ).student
    cached = distill(
        StoreTeacher(tmp_path / "store", teacher=teacher, data=digits.train),
        make_mlp(hidden=[8], seed=5),
        make_loader(digits.train, 32, shuffle=True),
        **options,
    ).student
    for (name, a), (_, b) in zip(
        online.state_dict().items(), cached.state_dict().items(), strict=True
    ):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name
    untouched = make_mlp(hidden=[8], seed=5).state_dict()
    assert not torch.equal(untouched["net.1.weight"], cached.state_dict()["net.1.weight"])


class NoisyDigits(Dataset):
    """Random augmentation: the same samples, with fresh noise on every read."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.inputs[i] + 0.01 * torch.randn_like(self.inputs[i]), self.targets[i], i


def test_augmented_inputs_are_refused(tmp_path: Path, digits, teacher, make_mlp) -> None:
    cache_teacher(teacher, digits.train, tmp_path / "store", progress=False)
    store_teacher = StoreTeacher(tmp_path / "store")
    ids = torch.arange(8)
    flipped = digits.train.inputs[ids].flip(-1)  # norm-preserving: caught by the projection
    with pytest.raises(StillroomError, match=r"random augmentation\?.*live teacher"):
        store_teacher(flipped, ids)
    with pytest.raises(StillroomError, match="differ from those the store"):
        store_teacher(digits.train.inputs[ids], ids.flip(0))  # right inputs, wrong ids
    loader = DataLoader(NoisyDigits(digits.train.inputs, digits.train.targets), batch_size=32)
    with pytest.raises(StillroomError, match="random augmentation"):
        distill(store_teacher, make_mlp(hidden=[8]), loader, alpha=0.5, epochs=1, progress=False)
    with pytest.raises(StillroomError, match="needs the sample index"):
        store_teacher(digits.train.inputs[ids], None)
    with pytest.raises(StillroomError, match="sample index 160 is out of range"):
        store_teacher.store.logits([3, 160])


def test_bad_options_fail_clearly(tmp_path: Path, digits, teacher) -> None:
    with pytest.raises(StillroomError, match=r"no module named 'net.22'.*closest: net.2"):
        cache_teacher(teacher, digits.train, tmp_path / "a", features=["net.22"], progress=False)
    with pytest.raises(StillroomError, match="top-k 11 is larger than the teacher's 10 classes"):
        cache_teacher(teacher, digits.train, tmp_path / "b", top_k=11, progress=False)
    with pytest.raises(StillroomError, match="q8 quantises top-k"):
        cache_teacher(teacher, digits.train, tmp_path / "c", precision="q8", progress=False)
    loud = nn.Sequential(teacher, nn.Linear(10, 10))
    nn.init.constant_(loud[1].weight, 1e6)
    with pytest.raises(StillroomError, match=r"exceed fp16's range.*--precision fp32"):
        cache_teacher(loud, digits.train, tmp_path / "d", progress=False)
    with pytest.raises(StillroomError, match="is incomplete"):
        SoftTargetStore.open(tmp_path / "d")
    with pytest.raises(StillroomError, match="not a stillroom store"):
        SoftTargetStore.open(tmp_path)


def test_memory_stays_flat_reading_a_large_store(tmp_path: Path) -> None:
    """A 40 MB store read twice over in random batches: the process holds far less than that."""
    inputs = torch.randn(10_000, 8, generator=torch.Generator().manual_seed(0))
    wide = nn.Linear(8, 1000)
    cache_teacher(
        wide, inputs, tmp_path / "store", precision="fp32", batch_size=2500, progress=False
    )
    store_bytes = sum(p.stat().st_size for p in (tmp_path / "store" / "shards").glob("*.npy"))
    assert store_bytes > 40e6
    process = psutil.Process()

    def growth(max_resident_bytes: int) -> int:
        with SoftTargetStore.open(
            tmp_path / "store", max_resident_bytes=max_resident_bytes
        ) as store:
            store.logits(np.arange(250))  # warm up allocators and hash the shard
            store.release()
            before = process.memory_info().rss
            for _ in range(2):
                for batch in np.random.default_rng(0).permutation(10_000).reshape(-1, 250):
                    assert store.logits(batch).shape == (250, 1000)
            return process.memory_info().rss - before

    bounded = growth(4 * 2**20)
    assert bounded < store_bytes / 4, f"RSS grew {bounded / 1e6:.1f} MB"
    # the check can fail: without releasing the mapped pages the process holds the whole store
    assert growth(2**40) > store_bytes / 2


class TinyLM(nn.Module):
    """Token ids (N, L) -> logits (N, L, V), a language model's output layout."""

    def __init__(self, vocab: int = 300) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Embedding(vocab, 16), nn.Linear(16, vocab)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(token_ids)))


def test_sequence_top_k_store_feeds_the_top_k_loss(tmp_path: Path) -> None:
    lm = TinyLM().eval()
    tokens = torch.randint(0, 300, (40, 12), generator=torch.Generator().manual_seed(0))
    manifest = cache_teacher(
        lm,
        tokens,
        tmp_path / "lm",
        top_k=16,
        precision="fp32",
        pack_indices=True,
        class_dim=-1,
        shard_size=16,
        batch_size=16,
        progress=False,
    )
    assert manifest.class_dim == 2 and manifest.fields["topk_indices"]["dtype"] == "uint8"
    assert manifest.fields["topk_indices"]["shape"] == [12, manifest.topk_codec().layout.num_bytes]
    assert manifest.dataset["input_dtype"] == "int64"
    ids = torch.tensor([3, 39, 20])
    targets = StoreTeacher(tmp_path / "lm", teacher=lm, data=tokens)(tokens[ids], ids)
    assert targets.logprobs.shape == (3, 12, 16) and targets.tail_mass.shape == (3, 12)
    student = torch.randn(3, 12, 300, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        live = topk_targets_from_logits(lm(tokens[ids]), 16, class_dim=-1)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[:, :4] = False  # e.g. prompt tokens
    from_store = topk_soft_target_loss(student, targets, 2.0, mask=mask)
    expected = topk_soft_target_loss(student, live, 2.0, mask=mask)
    torch.testing.assert_close(from_store, expected, rtol=2e-3, atol=1e-5)  # fp16 tails


def test_full_vocab_top_k_store_gives_the_soft_target_loss(tmp_path: Path, digits, teacher) -> None:
    cache_teacher(teacher, digits.train, tmp_path / "s", top_k=10, precision="fp32", progress=False)
    ids = torch.arange(0, 160, 7)
    inputs = digits.train.inputs[ids]
    student = torch.randn(len(ids), 10, generator=torch.Generator().manual_seed(2))
    targets = StoreTeacher(tmp_path / "s")(inputs, ids)
    with torch.no_grad():
        expected = soft_target_loss(student, teacher(inputs), 4.0)
    torch.testing.assert_close(topk_soft_target_loss(student, targets, 4.0, class_dim=1), expected)
