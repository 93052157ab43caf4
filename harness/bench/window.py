"""The GPU window: one prepared command that turns a lent GPU machine into figures, within its limits.

A lent machine is there for 15 minutes in all and 10 minutes per command, so the measurement is
staged in order of value, each stage with its own cap, the caps summing to at most 480 s (one
600 s command holds them with the machine's start and a margin). ``benchmarks/gpu.sh OUT`` runs
:func:`main`; ``--dry-run`` prints the plan and exits.

Each stage runs in a process group of its own (:mod:`harness.bench.measures`), so a stage that
passes its cap is killed with everything it started (loader workers, study workers) and the next
stage runs; a SIGTERM or SIGINT to this process ends the running stage's whole group the same way
before it exits (143 / 130). Stages append every measurement to ``OUT/records.jsonl`` the moment it
exists and the summary is rebuilt from that file after every stage, so whatever was measured
before a kill comes back. A stage also sees its own deadline and records the methods it had no
time for as skipped rather than being cut off mid-measurement.

Stages that need MLflow or Optuna (``train()`` and studies) are recorded as skipped where those
are missing; the others need only torch, timm, torchvision and peft, which the machine's image has.
OUT holds three files (``records.jsonl``, ``summary.md``, ``log.txt``): within what comes back
from the machine (8 files, 2 folders deep).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from harness.bench.records import Recorder, read, write_summary

#: what the whole plan may take on the lent machine: 600 s per command, less start and margin
BUDGET_S = 480.0
#: seconds a stage keeps in hand before its cap: it stops starting measurements after that
MARGIN_S = float(os.environ.get("DMLBENCH_STAGE_MARGIN_S", "8"))


@dataclass(frozen=True)
class Stage:
    name: str
    cap_s: float
    what: str
    needs: tuple[str, ...] = ()


#: in order of value: if the machine or its image is wrong, the smoke stage is all that is spent
STAGES = (
    Stage(
        "smoke",
        60,
        "imports; every method built once on the device at a tiny size, two steps of each "
        "(the second under torch.cuda.set_sync_debug_mode('error')); a few JPEGs through nvJPEG",
    ),
    Stage("step", 120, "every ViT-S method's training step against the plain timm loop (bf16, batch 64, 224 px)"),
    Stage(
        "e2e",
        120,
        "train() end to end on the CUB-shaped folder (200 x 60 JPEGs of 500x375): full "
        "fine-tuning, BitFit, VPTSP-G with the memory bank, on the cpu and device pipelines",
        needs=("mlflow",),
    ),
    Stage(
        "sop",
        45,
        "a SOP-shaped folder with the pixel cache off: nvJPEG decodes every batch (BitFit)",
        needs=("mlflow",),
    ),
    Stage("concurrency", 90, "K = 1, 2, 4 concurrent trials per device of a shrunk study", needs=("mlflow", "optuna")),
    Stage("decode", 20, "nvJPEG's pixels against libjpeg-turbo's on 256 files of the CUB-shaped folder"),
    Stage("mapr", 20, "exact Recall@K and MAP@R of 60,000 x 384 embeddings on the device"),
)
BY_NAME = {s.name: s for s in STAGES}
assert sum(s.cap_s for s in STAGES) <= BUDGET_S


def plan_text(stages: list[Stage], caps: dict[str, float]) -> str:
    lines = [f"{'stage':12s} {'cap s':>6s}  needs          what"]
    for s in stages:
        lines.append(f"{s.name:12s} {caps[s.name]:6.0f}  {','.join(s.needs) or '-':14s} {s.what}")
    total = sum(caps[s.name] for s in stages)
    lines.append(
        f"{'sum':12s} {total:6.0f}  (at most {BUDGET_S:.0f} s: one 600 s command holds it with the "
        "machine's start and a margin)"
    )
    return "\n".join(lines)


def missing(needs: tuple[str, ...]) -> list[str]:
    """The packages of ``needs`` this Python cannot import."""
    out = []
    for name in needs:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(name)
    return out


class Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StageProcess:
    """One stage's process, in a process group of its own, its output copied to ours and to the log."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        self.last_line = ""
        self.copier = threading.Thread(target=self._copy, args=(log,), daemon=True)
        self.copier.start()

    def _copy(self, log: Path) -> None:
        with open(log, "ab") as fh:
            for raw in iter(self.proc.stdout.readline, b""):
                sys.stdout.buffer.write(raw)
                sys.stdout.flush()
                fh.write(raw)
                fh.flush()
                if raw.strip():
                    self.last_line = raw.decode(errors="replace").strip()

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=max(0.1, timeout))
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGTERM to the whole group, SIGKILL to what is left after 5 s: nothing outlives the stage."""
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and _group_alive(self.proc.pid):
                self.proc.poll()
                time.sleep(0.05)
            if not _group_alive(self.proc.pid):
                break
        self.proc.poll()
        self.copier.join(timeout=2)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_stage(stage: Stage, cap: float, out: Path, options: dict, current: list) -> dict:
    """Run one stage to its end, its cap, or an interrupt; its own record says which."""
    recorder = Recorder(out, stage.name)
    absent = missing(stage.needs)
    if absent:
        return recorder.add(
            kind="stage",
            status="skipped",
            cap_s=cap,
            seconds=0.0,
            error=f"{', '.join(absent)} not installed (carry .whl/: bash benchmarks/wheels.sh)",
        )
    started = time.monotonic()
    env = {**os.environ, "DMLBENCH_STAGE_DEADLINE": str(time.time() + cap - MARGIN_S), "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "harness.bench.measures", stage.name, str(out), json.dumps(options), str(os.getpid())]
    print(f"== {stage.name} (cap {cap:.0f} s, {time.strftime('%H:%M:%S')}): {stage.what}", flush=True)
    process = StageProcess(argv, out / "log.txt", env)
    current[0] = process
    try:
        code = process.wait(cap)
    finally:
        if process.proc.poll() is None:
            process.kill()
        else:
            process.copier.join(timeout=2)
        current[0] = None
    seconds = round(time.monotonic() - started, 1)
    if code is None:
        return recorder.add(
            kind="stage",
            status="timeout",
            cap_s=cap,
            seconds=seconds,
            error=f"killed at its cap of {cap:.0f} s (the records it made are kept)",
        )
    if code != 0:
        return recorder.add(
            kind="stage",
            status="failed",
            cap_s=cap,
            seconds=seconds,
            error=f"exit {code}: {process.last_line or 'no output'}",
        )
    return recorder.add(kind="stage", status="ok", cap_s=cap, seconds=seconds)


def parse_caps(text: str) -> dict[str, float]:
    caps: dict[str, float] = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in BY_NAME:
            raise SystemExit(f"gpu.sh: unknown stage '{name}' in --caps; valid: {', '.join(BY_NAME)}")
        try:
            caps[name] = float(value)
        except ValueError:
            raise SystemExit(f"gpu.sh: bad cap '{item}' in --caps: expected stage=seconds") from None
    return caps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/gpu.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder for records.jsonl, summary.md and log.txt")
    p.add_argument("--dry-run", action="store_true", help="print the stages, their caps and their sum, then exit")
    p.add_argument("--tiny", action="store_true", help="toy sizes, for a CPU (the test suite)")
    p.add_argument("--stages", default="", help="comma-separated subset, in plan order (default: all)")
    p.add_argument("--caps", default="", help="stage=seconds,... to replace caps (tiny runs on a CPU)")
    p.add_argument("--methods", default="", help="smoke and step: these methods instead of every one")
    p.add_argument(
        "--workdir",
        default=os.environ.get("DMLBENCH_BENCH_WORKDIR", "/tmp/dmlbench-bench"),
        help="generated folders and the stores of the training runs (not brought back)",
    )
    args = p.parse_args(argv)
    names = [n for n in args.stages.split(",") if n] or list(BY_NAME)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        print(f"gpu.sh: unknown stage '{unknown[0]}'; valid: {', '.join(BY_NAME)}", file=sys.stderr)
        return 2
    stages = [s for s in STAGES if s.name in names]
    caps = {s.name: (600.0 if args.tiny else s.cap_s) for s in STAGES} | parse_caps(args.caps)
    if args.dry_run:
        print(plan_text(stages, caps))
        return 0
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    options = {
        "tiny": args.tiny,
        "workdir": str(Path(args.workdir).resolve()),
        "methods": [m for m in args.methods.split(",") if m],
    }
    current: list = [None]

    def on_signal(signum: int, frame) -> None:
        for s in (signal.SIGTERM, signal.SIGINT):  # one interrupt: the clean-up below is not cut short
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    begun = time.monotonic()
    try:
        for stage in stages:
            record = run_stage(stage, caps[stage.name], out, options, current)
            write_summary(out)
            print(
                f"== {stage.name}: {record['status']}" + (f" ({record['error']})" if record.get("error") else ""),
                flush=True,
            )
    except Interrupted as exc:
        if current[0] is not None:
            current[0].kill()
        done = {r["stage"] for r in read(out) if r.get("kind") == "stage"}
        for stage in stages:
            if stage.name not in done:
                Recorder(out, stage.name).add(
                    kind="stage",
                    status="interrupted",
                    cap_s=caps[stage.name],
                    error=f"{exc} after {time.monotonic() - begun:.0f} s",
                )
                break
        write_summary(out)
        print(
            f"gpu.sh: {exc}: stopped every process it started; the records made so far are in {out}",
            file=sys.stderr,
            flush=True,
        )
        return 128 + exc.signum
    text = write_summary(out)
    print(text, end="")
    failed = [r for r in read(out) if r.get("kind") == "stage" and r["status"] in ("failed", "timeout")]
    print(f"gpu.sh: done in {time.monotonic() - begun:.0f} s; records in {out / 'records.jsonl'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
