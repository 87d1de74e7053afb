"""Ahead-of-time builds of the Triton kernels for a GPU target, on a machine without one.

:func:`compile_with_report` builds one kernel for ``sm_<arch>`` and returns what the compiler and
``ptxas`` report: shared memory per block, registers per thread and bytes of register spills
(``ptxas -v``'s spill stores + loads). The phase-update tests call it in-process.

Run as a script in a process without ``TRITON_INTERPRET`` (the fused linear's tests start it): reads
a JSON list of builds on stdin, each ``{"kernel", "dtype", "rank_block", "has_keep", "has_bias",
"blocks", "launch", "arch"}`` (``arch`` 80, 86, 90, ...), and prints one JSON object per build with
``shared``, ``registers``, ``spills``, ``i32_tensor_muls`` (int32 products of index tensors: the
address arithmetic that overflows past 2³¹ elements) and ``narrow_addptr_offsets`` (pointer offsets
that are not int64).

**Spill bounds.** :data:`SPILL_BOUNDS` states, per kernel and rank extent, the most bytes of
spills the tests accept in the configurations the launch code chooses (0 unless listed); the tests
print every build's count per target. Why the listed ones are kept: docs/kernels.md ("Register
spills").
"""

import contextlib
import io
import json
import re
import sys
from pathlib import Path

# Bytes of spill stores + loads (ptxas -v) accepted per (kernel, padded rank or rank block) in the
# configurations the launch code chooses; any other build must not spill. Measured with Triton 3.9
# for sm_80/86/90 (the largest of the three in the comment), with headroom for another ptxas.
SPILL_BOUNDS = {
    # The phase update at R = 128: R×R fp32 tiles (64 KB each) outgrow the register file at every
    # warp count (docs/kernels.md); the update holds its chunk's Gram and cross-Gram accumulators,
    # the factor kernel the Schur complement and L⁻¹ with the rank-1 update's temporaries.
    ("_update_kernel", 16): 64,  # 16 (fp32 AltLoRA+ A phase, sm_80/86)
    ("_update_kernel", 64): 64,  # 20 (bf16/fp16 plain AltLoRA, sm_90)
    ("_update_kernel", 128): 6144,  # 4800
    ("_factor_kernel", 128): 12288,  # 8192
    ("_reduce_kernel", 128): 768,  # 464
    # The fused linear: bf16/fp16's 128×128 GEMM tile in its low-rank epilogue, and a few words
    # here and there (fp32 ≤ 28 bytes).
    ("_project_kernel", 16): 64,  # 20
    ("_project_kernel", 32): 64,  # 12
    ("_project_kernel", 64): 512,  # 320
    ("_matmul_plus_low_rank_kernel", 16): 1024,  # 456
    ("_matmul_plus_low_rank_kernel", 32): 1024,  # 436
    ("_matmul_plus_low_rank_kernel", 64): 1024,  # 628
    ("_low_rank_grad_kernel", 32): 64,  # 20
}

_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")


def spill_bound(kernel: str, extent: int) -> int:
    """Bytes of spills accepted for ``kernel`` at padded rank / rank block ``extent``."""
    return SPILL_BOUNDS.get((kernel, extent), 0)


def _ptxas_report(log: str):
    spills, registers = _PTXAS_SPILLS.findall(log), _PTXAS_REGISTERS.findall(log)
    if not spills or not registers:
        return None
    stores, loads = (int(v) for v in spills[-1])
    return {"registers": int(registers[-1]), "spills": stores + loads}


def compile_with_report(fn, signature: dict, constexprs: dict, arch: int, options: dict):
    """``(compiled, {"shared", "registers", "spills"})`` of ``fn`` built for ``sm_<arch>``.

    ptxas's ``-v`` log (which Triton prints when ``dump_ptxas_log`` is on) holds the register and
    spill counts; a build served from Triton's cache runs no ptxas, so the counts are kept next to
    the cached build (keyed by its hash), and rebuilt once if missing.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    knobs = triton.knobs

    def build(always: bool):
        log = io.StringIO()
        with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True
            knobs.compilation.always_compile = always
            compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32),
                                      options=dict(options))
        return compiled, _ptxas_report(log.getvalue())

    compiled, report = build(False)
    kept = Path(knobs.cache.dir) / "altlora-ptxas" / f"{compiled.hash}.json"
    if report is None and kept.exists():
        report = json.loads(kept.read_text())
    if report is None:
        compiled, report = build(True)
        if report is None:
            raise RuntimeError("ptxas -v reported no register or spill counts: has its log format changed?")
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text(json.dumps(report))
    return compiled, {"shared": int(compiled.metadata.shared), **report}


def print_report(title: str, rows, columns) -> None:
    """A plain table of ``rows`` (dicts) on stdout: what ``pytest -s`` / ``-rP`` shows per target."""
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))

_DTYPES = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}
_I32_TENSOR_MUL = re.compile(r"arith\.muli .*: tensor<[0-9x]+xi32>")
_ADDPTR = re.compile(r"tt\.addptr .*: (?:tensor<[0-9x]+x)?!tt\.ptr<[^>]+>>?, (?:tensor<[0-9x]+x)?(i\d+)>?")


def build(spec: dict) -> dict:
    from altlora_kernels import triton_lora_linear as T

    fn = {"project": T.PROJECT_KERNEL, "matmul_plus_low_rank": T.MATMUL_PLUS_LOW_RANK_KERNEL,
          "low_rank_grad": T.LOW_RANK_GRAD_KERNEL}[spec["kernel"]].get()
    dtype = _DTYPES[spec["dtype"]]
    constexprs = {"HAS_KEEP": spec["has_keep"], "UPCAST": False, "PRECISION": "ieee" if dtype == "fp32" else "tf32",
                  "RANK_BLOCK": spec["rank_block"], **spec["blocks"]}
    if spec["kernel"] == "matmul_plus_low_rank":
        constexprs["HAS_BIAS"] = spec.get("has_bias", True)
    signature = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg == "keep_ptr":
            signature[arg] = "*u8"
        elif arg.endswith("_ptr"):
            signature[arg] = "*" + dtype
        else:
            signature[arg] = "fp32" if arg in ("scale", "scaling") else "i32"
    compiled, report = compile_with_report(fn, signature, constexprs, spec["arch"], spec["launch"])
    ttir = compiled.asm["ttir"]
    return {
        **spec,
        **report,
        "i32_tensor_muls": [line.strip() for line in ttir.splitlines() if _I32_TENSOR_MUL.search(line)],
        "narrow_addptr_offsets": [line.strip() for line in ttir.splitlines()
                                  if "tt.addptr" in line and (m := _ADDPTR.search(line)) and m.group(1) != "i64"],
    }


if __name__ == "__main__":
    from altlora_kernels.triton_runtime import interpreter_enabled

    assert not interpreter_enabled(), "ahead-of-time builds need TRITON_INTERPRET unset"
    for spec in json.load(sys.stdin):
        print(json.dumps(build(spec)), flush=True)
