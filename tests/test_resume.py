"""Checkpoints and resume (orchestrator/checkpoint.py, TrainerRank.save/load_checkpoint).

Without engines: the atomic directory protocol, metrics truncation, the orchestrator's state round trip,
config compatibility, and a trainer rank restored bit for bit.  With engines (marked ``engine``): one run
killed with SIGKILL and resumed, compared with itself before the kill; one asynchronous run stopped with
SIGTERM and resumed.
"""

from __future__ import annotations

import json
import math
import random

import msgspec
import pytest

from orchestrator import checkpoint
from shared.config import ConfigError, load
from shared.metrics import read_metrics


# -- the directory protocol ---------------------------------------------------------------------------
def _write(out, step, keep=2, payload="x"):
    tmp = checkpoint.begin(out, step)
    (tmp / "part").write_text(payload)
    return checkpoint.commit(out, step, tmp, keep)


def test_only_complete_checkpoints_count(tmp_path):
    assert checkpoint.latest(tmp_path) is None
    _write(tmp_path, 2)
    tmp = checkpoint.begin(tmp_path, 4)  # a run killed while writing step 4
    (tmp / "part").write_text("half")
    (checkpoint.root(tmp_path) / "step_6").mkdir()  # a directory without its marker is never trusted
    assert checkpoint.latest(tmp_path) == (2, checkpoint.root(tmp_path) / "step_2")
    checkpoint.remove_partial(tmp_path)
    assert not tmp.exists()


def test_commit_keeps_the_newest_and_replaces_a_rewritten_step(tmp_path):
    for step in (1, 2, 3, 4):
        _write(tmp_path, step, keep=2)
    assert [s for s, _ in checkpoint.complete(tmp_path)] == [3, 4]
    _write(tmp_path, 4, keep=2, payload="again")  # a resumed run writes step 4 again
    assert (checkpoint.root(tmp_path) / "step_4" / "part").read_text() == "again"
    assert sorted(p.name for p in checkpoint.root(tmp_path).iterdir()) == ["step_3", "step_4"]


# -- signed manifests (orchestrator/ckpt_sign.py) ------------------------------------------------------
@pytest.fixture
def key_env(tmp_path, monkeypatch):
    """This test's own key (never the user's): its path, and a function that switches to another key."""
    from orchestrator import ckpt_sign

    path = tmp_path / "keys" / "checkpoint.key"
    monkeypatch.setenv(ckpt_sign.KEY_ENV, str(path))
    return path


def _refused(out, match: str):
    with pytest.raises(ConfigError) as e:
        checkpoint.require_latest(out)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"resume: checkpoint {checkpoint.root(out) / 'step_2'} is refused: "), msg
    assert match in msg and msg.endswith("set ckpt.trust_unsigned = true to load it anyway, only if you trust "
                                         "where it came from"), msg
    assert checkpoint.require_latest(out, trust_unsigned=True)[0] == 2  # trusted on purpose: accepted


def test_signed_checkpoint_verifies_and_the_key_is_private(tmp_path, key_env):
    import hashlib
    import stat

    from orchestrator import ckpt_sign

    d = _write(tmp_path, 2)
    assert checkpoint.require_latest(tmp_path) == (2, d)
    assert stat.S_IMODE(key_env.stat().st_mode) == 0o600 and len(bytes.fromhex(key_env.read_text())) == 32
    key = key_env.read_bytes()
    _write(tmp_path, 3)
    assert key_env.read_bytes() == key  # created once, then reused
    manifest = json.loads((checkpoint.root(tmp_path) / "step_3" / "MANIFEST.json").read_text())
    assert manifest["files"] == {"COMPLETE": hashlib.sha256(b"3\n").hexdigest(), "part": hashlib.sha256(b"x").hexdigest()}
    key_env.chmod(0o644)
    with pytest.raises(ConfigError, match=r"^OPD_CHECKPOINT_KEY: the checkpoint key .* is readable by others \(mode 644\)"):
        ckpt_sign.load_key()


def test_changed_file_is_refused(tmp_path, key_env):
    d = _write(tmp_path, 2)
    (d / "part").write_text("y")
    _refused(tmp_path, "part was changed (its SHA-256 differs from the signed manifest)")


def test_missing_and_added_files_are_refused(tmp_path, key_env):
    d = _write(tmp_path, 2)
    (d / "extra.pt").write_bytes(b"\x80")
    _refused(tmp_path, "extra.pt is not in the signed manifest")
    (d / "extra.pt").unlink()
    (d / "part").unlink()
    _refused(tmp_path, "part is missing")


def test_unsigned_checkpoint_is_refused(tmp_path, key_env):
    d = _write(tmp_path, 2)
    (d / "MANIFEST.json").unlink()
    _refused(tmp_path, "unsigned (no MANIFEST.json)")


def test_checkpoint_of_another_key_is_refused(tmp_path, key_env, monkeypatch):
    from orchestrator import ckpt_sign

    monkeypatch.setenv(ckpt_sign.KEY_ENV, str(tmp_path / "elsewhere.key"))
    _write(tmp_path, 2)  # signed on "another machine"
    monkeypatch.setenv(ckpt_sign.KEY_ENV, str(key_env))
    _refused(tmp_path, "signed with another key (key id ")


def test_manifest_edited_to_match_a_changed_file_is_refused(tmp_path, key_env):
    import hashlib

    d = _write(tmp_path, 2)
    (d / "part").write_text("evil")
    m = json.loads((d / "MANIFEST.json").read_text())
    m["files"]["part"] = hashlib.sha256(b"evil").hexdigest()
    (d / "MANIFEST.json").write_text(json.dumps(m))
    _refused(tmp_path, "MANIFEST.json was changed after it was signed (its HMAC does not match)")


def test_resume_from_a_changed_checkpoint_is_one_line_from_the_cli(tmp_path, key_env):
    """The real CLI: exit 2, one line, before Ray starts; --ckpt.trust_unsigned gets past the check (to the next
    one: this checkpoint has no meta.json)."""
    import os
    import subprocess

    from tests.conftest import RL, ROOT

    out = tmp_path / "run"
    d = _write(out, 2)
    (d / "part").write_text("y")
    cmd = [RL, "@", "experiments/reverse_text/rl.toml", "--output_dir", str(out), "--resume"]
    env = {**os.environ, "OPD_CHECKPOINT_KEY": str(key_env)}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith(f"error: resume: checkpoint {d} is refused: part was changed"), p.stderr
    p = subprocess.run([*cmd, "--ckpt.trust_unsigned", "true"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=env)
    assert p.returncode == 2 and p.stderr.startswith(f"error: resume: {d}/meta.json is unreadable"), p.stderr


def test_require_latest_names_the_directory(tmp_path):
    with pytest.raises(ConfigError) as e:
        checkpoint.require_latest(tmp_path / "run")
    assert str(e.value) == f"resume: no complete checkpoint in {tmp_path / 'run' / 'checkpoints'} (set ckpt.interval " \
                           "to write them)"


def test_truncate_metrics_drops_later_steps_and_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "time/startup_trainer": 1.0}, {"step": 0, "eval/x/avg": 0.1}, {"step": 1, "teacher_kl": 3.0},
            {"step": 2, "teacher_kl": 2.0}, {"step": 2, "eval/x/avg": 0.2}, {"step": 3, "teacher_kl": 1.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "teach')  # torn by a SIGKILL
    assert checkpoint.truncate_metrics(path, 2) == 2
    assert read_metrics(path) == rows[:5]
    assert path.read_text().endswith("\n")


def test_check_compatible_names_the_changed_key():
    saved = msgspec.to_builtins(load(["--max_steps", "10"]))
    checkpoint.check_compatible(saved, load(["--max_steps", "20", "--ckpt.interval", "5", "--resume",
                                             "--orchestrator.max_async_level", "1"]))
    with pytest.raises(ConfigError, match=r"^resume: trainer.lr is 0.001 but the checkpoint was written with 0.002;"):
        checkpoint.check_compatible(saved, load(["--trainer.lr", "1e-3"]))
    with pytest.raises(ConfigError, match=r"^resume: seed is 1 "):
        checkpoint.check_compatible(saved, load(["--seed", "1"]))


# -- the orchestrator's state -----------------------------------------------------------------------------
def test_prompt_stream_state_round_trip():
    """An environment (and a replay mix of environments) continues exactly where the snapshot was taken."""
    from orchestrator import environments
    from orchestrator.continual import ReplayMix

    cfg = load(["--orchestrator.environment", "arithmetic", "--seed", "3"])
    env = environments.make(cfg)
    env.next_prompts(5)
    snap = msgspec.msgpack.decode(msgspec.msgpack.encode(checkpoint.state_of(env)))  # through the file format
    ahead = [p.text for p in env.next_prompts(7)]
    fresh = environments.make(cfg)
    checkpoint.restore(fresh, snap)
    assert fresh.position == 5 and [p.text for p in fresh.next_prompts(7)] == ahead

    def mix():
        main = environments.make(cfg)
        return ReplayMix(main, main, {"fmt": environments.make(
            load(["--orchestrator.environment", "format_check", "--seed", "3"]))}, 0.25)

    a = mix()
    a.next_prompts(8)
    snap = msgspec.msgpack.decode(msgspec.msgpack.encode(checkpoint.state_of(a)))
    ahead = [p.text for p in a.next_prompts(8)]
    b = mix()
    checkpoint.restore(b, snap)
    assert [p.text for p in b.next_prompts(8)] == ahead and b.turn == a.turn and b.position == a.position


@pytest.mark.parametrize("name", ["reverse_text", "arithmetic", "format_check", "french", "reverse_text_long"])
def test_every_generated_environment_has_a_checkpointable_stream(name):
    from orchestrator import environments

    cfg = load(["--orchestrator.environment", name])
    env = environments.make(cfg)
    snap = checkpoint.state_of(env)
    ahead = [p.text for p in env.next_prompts(4)]
    checkpoint.restore(env, snap)
    assert [p.text for p in env.next_prompts(4)] == ahead


def test_reward_sources_and_question_sources_snapshot():
    from orchestrator.question_sources import TeacherQuestions
    from orchestrator.workflows.base import RewardSource

    tq = TeacherQuestions(load([]).orchestrator.comparator, lambda m: "1. What is red?\n2. Why?\n3. How?")
    tq.next_prompts(1)
    snap = msgspec.msgpack.decode(msgspec.msgpack.encode(checkpoint.state_of(tq)))
    other = TeacherQuestions(load([]).orchestrator.comparator, lambda m: "")
    checkpoint.restore(other, snap)
    assert other.buffer == ["Why?", "How?"] and other.seen == tq.seen and other.requests == 1
    assert checkpoint.state_of(RewardSource(lambda p, t: 1.0)) == {"__obj__": "RewardSource"}


def test_state_of_handles_sets_deques_and_refuses_unknown_objects():
    import collections

    state = {"seen": {"b", "a"}, "recent": collections.deque([(1, 2)], maxlen=3), "rng": random.Random(7)}
    back = checkpoint.restore(None, msgspec.msgpack.decode(msgspec.msgpack.encode(checkpoint.state_of(state))))
    assert back["seen"] == {"a", "b"} and back["recent"] == collections.deque([[1, 2]], maxlen=3)
    assert back["rng"].random() == random.Random(7).random()
    with pytest.raises(TypeError, match="cannot snapshot a object"):
        checkpoint.state_of(object())


def test_batch_state_keeps_every_float_exact():
    from orchestrator.data import Prompt
    from orchestrator.pipeline import Batch
    from shared.wire import Rollout

    b = Batch(step=3, prompts=[Prompt(text="abc=", answer="cba", meta={"k": [1, 2]})], base=16,
               rollouts=[Rollout(prompt_index=16, prompt_ids=[1, 2], completion_ids=[5, 6],
                                             logprobs=[-0.1, -1e-300], text="cb")],
               adapter_steps={16: 1}, empty=1, teacher_lp=[[float("-inf"), float("nan")]])
    back = Batch.from_state(msgspec.msgpack.decode(msgspec.msgpack.encode(b.state())))
    assert back.prompts == b.prompts and back.rollouts == b.rollouts and back.adapter_steps == {16: 1}
    assert back.teacher_lp[0][0] == float("-inf") and math.isnan(back.teacher_lp[0][1])
    assert (back.step, back.base, back.empty) == (3, 16, 1)


# -- the trainer, restored bit for bit ------------------------------------------------------------------
def _trainer_spec(cfg) -> dict:
    t, m = cfg.trainer, cfg.model
    return dict(seed=cfg.seed, dtype=m.dtype, lr=t.lr, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
                lr_schedule="cosine", warmup_steps=1, min_lr_ratio=0.1, total_steps=10, lora_rank=m.lora.rank,
                lora_alpha=m.lora.alpha, lora_dropout=0.1, lora_targets=list(m.lora.target_modules),
                mask_ratio_low=t.loss.mask_ratio_low, mask_ratio_high=t.loss.mask_ratio_high)


def _batch(step: int, seed: int) -> bytes:
    from shared.wire import TrainBatch, TrainSample, encode

    rng = random.Random(seed)
    samples = []
    for _ in range(4):
        prompt = [1] + [rng.randrange(4, 30) for _ in range(5)]
        completion = [rng.randrange(4, 30) for _ in range(6)]
        samples.append(TrainSample(input_ids=prompt + completion, prompt_len=len(prompt),
                                   inference_logprobs=[-rng.uniform(0.5, 4.0) for _ in completion],
                                   advantages=[rng.uniform(-2, 2) for _ in completion]))
    return encode(TrainBatch(step=step, samples=samples, total_tokens=24, num_micro_batches=2))


def _rank(tiny_pair, rendezvous, spec: dict, out):
    """A real single-rank trainer (gloo, in this process) on the tiny student, set up; it meets at ``rendezvous``."""
    from trainer.worker import TrainerRank

    r = TrainerRank(0, 1, "gloo", f"file://{rendezvous}", str(tiny_pair[1]), spec, str(out), None)
    r.setup()
    return r


def test_trainer_rank_resumes_bit_for_bit(tiny_pair, tmp_path):
    """Step 2 after a restore from the checkpoint of step 1 equals step 2 of the run that went on (weights,
    AdamW moments, cosine schedule and the dropout RNG all restored); without the restore it differs."""
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file

    from shared.wire import StepResult, decode

    spec = _trainer_spec(load([]))
    out = tmp_path / "out"

    def rank(name):
        return _rank(tiny_pair, tmp_path / name, spec, out)

    def step2(r):
        res = decode(r.train_step(_batch(2, 2)), StepResult)
        return res.metrics, load_file(out / "broadcast" / "step_2" / "adapter_model.safetensors")

    threads = torch.get_num_threads()
    try:
        first = rank("rdv1")
        first.train_step(_batch(1, 1))
        step1 = load_file(out / "broadcast" / "step_1" / "adapter_model.safetensors")
        tmp = checkpoint.begin(tmp_path / "run", 1)
        first.save_checkpoint(str(tmp))
        signed = checkpoint.commit(tmp_path / "run", 1, tmp, keep=2)  # signed over the real shards
        went_on, went_on_w = step2(first)
        dist.destroy_process_group()

        resumed = rank("rdv2")
        assert checkpoint.require_latest(tmp_path / "run") == (1, signed)  # verified before it is read
        resumed.load_checkpoint(str(signed), 1)
        rewritten = load_file(out / "broadcast" / "step_1" / "adapter_model.safetensors")
        assert rewritten.keys() == step1.keys() and all(torch.equal(rewritten[k], step1[k]) for k in step1)
        again, again_w = step2(resumed)
        dist.destroy_process_group()

        fresh = rank("rdv3")  # the same step 2 without the checkpoint: the comparison can fail
        _, fresh_w = step2(fresh)
        dist.destroy_process_group()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(threads)
    for key in ("loss/policy", "grad_norm", "lr", "masked_low", "ratio_sum"):
        assert again[key] == went_on[key], key
    assert all(torch.equal(again_w[k], went_on_w[k]) for k in went_on_w)
    assert not all(torch.equal(fresh_w[k], went_on_w[k]) for k in went_on_w)
    files = sorted(p.name for p in (signed / "trainer").iterdir())
    assert ".metadata" in files and "rank_0.pt" in files and any(f.endswith(".distcp") for f in files)
    manifest = json.loads((signed / "MANIFEST.json").read_text())
    assert sorted(manifest["files"]) == ["COMPLETE", *sorted(f"trainer/{f}" for f in files)]
    meta = signed / "trainer" / ".metadata"  # what dcp unpickles: one byte changed is refused before that
    meta.write_bytes(meta.read_bytes()[:-1] + bytes([meta.read_bytes()[-1] ^ 1]))
    with pytest.raises(ConfigError, match=r"trainer/\.metadata was changed \(its SHA-256 differs"):
        checkpoint.require_latest(tmp_path / "run")


def test_resume_without_checkpoint_is_one_line(tiny_pair, tmp_path):
    """The real CLI: exit status 2 and one line naming the directory searched, before Ray starts."""
    import subprocess

    from tests.conftest import RL, ROOT

    p = subprocess.run([RL, "@", "experiments/reverse_text/rl.toml", "--output_dir", str(tmp_path / "run"),
                        "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip() == f"error: resume: no complete checkpoint in {tmp_path / 'run' / 'checkpoints'} " \
                               "(set ckpt.interval to write them)"


# -- with engines: a run killed and resumed, a run stopped by SIGTERM and resumed -----------------------------
def _train_rows(out) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if "teacher_kl" in r]


def _start(out, *args):
    import subprocess

    from tests.conftest import RL, ROOT

    cmd = [RL, "@", "experiments/reverse_text/rl.toml", "--output_dir", str(out), "--wandb.mode", "disabled",
           "--orchestrator.batch_size", "8", "--orchestrator.eval.num_prompts", "8", "--orchestrator.eval.interval",
           "0", *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc, out, step: int, timeout: float = 300) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not any(r["step"] >= step for r in _train_rows(out)):
        assert proc.poll() is None, f"the run ended early: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) is not a running process
        return open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


# Same seed, same prompts (the stream's state is restored), same adapter bits served (broadcast/step_N is
# rewritten from the checkpoint), vLLM sampling seeded per prompt index, the trainer's weights, AdamW moments
# and schedule restored bit for bit: a resumed step recomputes exactly what the uninterrupted run computed.
# Integer-valued metrics must be equal; floats get a 1e-6 relative tolerance only against a kernel's
# summation order (step-to-step changes of these metrics are ~1e-2).
EXACT = ("tokens/step", "seq_len/mean", "rollouts/empty", "reward/mean", "masked/low", "masked/high")
CLOSE = ("teacher_kl", "loss/policy", "grad_norm", "train/lr", "combined_advantage", "ratio/mean")


@pytest.mark.engine
def test_trainer_killed_then_resumed_matches_the_uninterrupted_steps(tiny_pair, tmp_path):
    """SIGKILL the trainer actor's process mid-run (as the OOM killer would): the run names the trainer and
    exits 1 within seconds, no actor process survives; ``--resume`` continues from the last complete
    checkpoint, recomputes the steps after it exactly as the killed run had computed them, and leaves one
    row per step."""
    import os
    import signal
    import time

    out = tmp_path / "run"
    args = ("--max_steps", "7", "--ckpt.interval", "3")
    proc = _start(out, *args)
    _wait_for_step(proc, out, 5)
    pids = json.loads((out / "logs" / "pids.json").read_text())
    os.kill(pids["trainer-0"], signal.SIGKILL)
    t_kill = time.monotonic()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-3000:]
    assert time.monotonic() - t_kill < 30
    assert err.strip().splitlines()[-1].startswith("error: trainer failed: "), err[-2000:]
    assert "Traceback" not in err
    deadline = time.monotonic() + 20  # Ray reaps its workers right after the driver's shutdown
    while any(_alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [name for name, p in pids.items() if _alive(p)], "orphan processes"

    before = {r["step"]: r for r in _train_rows(out)}
    ckpt_step, _ = checkpoint.latest(out)
    assert ckpt_step in (3, 6) and max(before) > ckpt_step
    proc = _start(out, *args, "--resume")
    _, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    rows = read_metrics(out / "metrics.jsonl")
    train = [r for r in rows if "teacher_kl" in r]
    assert [r["step"] for r in train] == list(range(1, 8))  # no step lost, none twice
    assert [r["step"] for r in rows if "resumed_from" in r] == [ckpt_step]
    assert [r["step"] for r in rows if "eval/reverse_text/avg" in r] == [0, 7]
    redone = [r for r in train if ckpt_step < r["step"] <= max(before)]
    assert redone
    for r in redone:
        old = before[r["step"]]
        for key in EXACT:
            assert r[key] == old[key], (r["step"], key)
        for key in CLOSE:
            assert r[key] == pytest.approx(old[key], rel=1e-6, abs=1e-9), (r["step"], key)
    for r in train[:ckpt_step]:
        assert r == before[r["step"]]  # the rows up to the checkpoint are the killed run's own


@pytest.mark.engine
def test_async_run_with_two_engines_and_two_ranks_stops_on_sigterm_and_resumes(tiny_pair, tmp_path):
    """max_async_level = 1 on 2 student engines and 2 trainer ranks (the CPU form of data-parallel inference
    and FSDP2 over gloo): the next step's rollouts are sampled while the trainer works, one step stale;
    SIGTERM finishes the step, writes a checkpoint (each rank its shard, the buffer of rollouts sampled
    ahead) and exits 143; ``--resume`` trains on those buffered rollouts and completes."""
    import signal

    out = tmp_path / "run"
    args = ("--max_steps", "6", "--orchestrator.max_async_level", "1", "--inference.parallel.dp", "2",
            "--trainer.cpu_ranks", "2")
    proc = _start(out, *args)
    _wait_for_step(proc, out, 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    stopped = max(r["step"] for r in _train_rows(out))
    assert f"stopped by SIGTERM after step {stopped}; checkpoint: " in err and "Traceback" not in err
    assert checkpoint.latest(out)[0] == stopped < 6
    directory = checkpoint.latest(out)[1]
    shards = sorted(p.name for p in (directory / "trainer").iterdir())
    assert "rank_0.pt" in shards and "rank_1.pt" in shards
    buffered = checkpoint.read_state(directory)["buffer"]
    assert [b["step"] for b in buffered] == [stopped + 1]  # sampled ahead during the last step, kept

    proc = _start(out, *args, "--resume")
    _, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    train = _train_rows(out)
    assert [r["step"] for r in train] == list(range(1, 7))
    for r in train:
        assert r["async/staleness_max"] == (0 if r["step"] == 1 else 1), r["step"]
        assert r["async/dropped_rollouts"] == 0
        assert 0 < r["busy/trainer"] <= 1 and r["time/overlap"] >= 0
        if r["step"] < 6:  # the last step has nothing left to sample: its rollouts came during step 5
            assert 0 < r["busy/inference"] <= 1 and r["time/overlap"] > 0, r
    # the two engines both sampled: a buffered group's adapter step is the one that engine served
    assert all(set(map(int, b["adapter_steps"].values())) == {stopped - 1} for b in buffered)


# -- a full disk: ENOSPC while writing an adapter and a checkpoint --------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A real 64 MB tmpfs (the run's output directory on a disk that fills up); needs root to mount."""
    import subprocess

    where = tmp_path / "disk"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}): ENOSPC is not injected")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(disk) -> None:
    """Write a ballast file until the disk is full (ENOSPC), down to its last byte."""
    import errno
    import os

    fd = os.open(disk / "ballast", os.O_WRONLY | os.O_CREAT)
    try:
        size = 1 << 20
        while size:
            try:
                os.write(fd, b"\0" * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC
                size //= 2
    finally:
        os.close(fd)


def test_a_full_disk_during_an_adapter_and_a_checkpoint_write_keeps_the_previous_checkpoint(tiny_pair, small_disk,
                                                                                         tmp_path):
    """A real rank writing to a tmpfs that fills up after the checkpoint of step 1: step 2's adapter write and
    then the checkpoint of step 2 fail with ENOSPC, each as one line (what the run prints after ``trainer
    failed:``), leaving no half-written adapter; the checkpoint of step 1 stays complete and verifies, the
    partial one is removed as a resumed run starts, and a fresh rank resumes from step 1 (on the freed disk)
    and trains step 2 exactly as the uninterrupted rank would have."""
    import errno

    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file

    from shared.runtime import first_line
    from shared.wire import StepResult, decode

    spec = _trainer_spec(load([]))
    out = small_disk / "run"

    def rank(name):
        return _rank(tiny_pair, tmp_path / name, spec, out)

    threads = torch.get_num_threads()
    try:
        first = rank("rdv1")
        first.train_step(_batch(1, 1))
        tmp = checkpoint.begin(out, 1)
        first.save_checkpoint(str(tmp))
        signed = checkpoint.commit(out, 1, tmp, keep=2)
        before = {p.relative_to(signed): p.read_bytes() for p in signed.rglob("*") if p.is_file()}
        _fill(small_disk)
        with pytest.raises(OSError) as adapter_error:
            first.train_step(_batch(2, 2))
        assert adapter_error.value.errno == errno.ENOSPC
        assert not (out / "broadcast" / ".step_2.tmp").exists() and not (out / "broadcast" / "step_2").exists()
        tmp = checkpoint.begin(out, 2)
        with pytest.raises(OSError) as ckpt_error:
            first.save_checkpoint(str(tmp))
        assert ckpt_error.value.errno == errno.ENOSPC
        dist.destroy_process_group()

        (small_disk / "ballast").unlink()  # the user frees space and resumes
        checkpoint.remove_partial(out)  # what a resumed run does first
        assert checkpoint.require_latest(out) == (1, signed)  # complete, signed, unchanged
        assert {p.relative_to(signed): p.read_bytes() for p in signed.rglob("*") if p.is_file()} == before
        assert not list((out / "checkpoints").glob(".step_*"))
        resumed = rank("rdv2")
        resumed.load_checkpoint(str(signed), 1)
        again = decode(resumed.train_step(_batch(2, 2)), StepResult)
        dist.destroy_process_group()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(threads)
    for error in (adapter_error.value, ckpt_error.value):
        line = first_line(error)
        assert "\n" not in line and "No space left on device" in line, line
    assert again.metrics["skipped_step"] == 0.0 and math.isfinite(again.metrics["grad_norm"])
    assert (out / "broadcast" / "step_2" / "COMPLETE").exists()
    assert load_file(out / "broadcast" / "step_2" / "adapter_model.safetensors").keys() == \
        load_file(out / "broadcast" / "step_1" / "adapter_model.safetensors").keys()
