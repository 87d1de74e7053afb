"""Ahead-of-time builds of the fused LoRA linear's kernels for a GPU target, on a machine without one.

Run as a script in a process without ``TRITON_INTERPRET`` (the tests start it): reads a JSON list of
builds on stdin, each ``{"kernel", "dtype", "rank_block", "has_keep", "has_bias", "blocks",
"launch", "arch"}`` (``arch`` 80, 86, 90, ...), and prints one JSON object per build with what the
compiler reports: ``shared`` (bytes of shared memory per block), ``i32_tensor_muls`` (int32 products
of index tensors: the address arithmetic that overflows past 2³¹ elements) and
``narrow_addptr_offsets`` (pointer offsets that are not int64).
"""

import json
import re
import sys

_DTYPES = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}
_I32_TENSOR_MUL = re.compile(r"arith\.muli .*: tensor<[0-9x]+xi32>")
_ADDPTR = re.compile(r"tt\.addptr .*: (?:tensor<[0-9x]+x)?!tt\.ptr<[^>]+>>?, (?:tensor<[0-9x]+x)?(i\d+)>?")


def build(spec: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

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
    compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", spec["arch"], 32),
                              options=dict(spec["launch"]))
    ttir = compiled.asm["ttir"]
    return {
        **spec,
        "shared": int(compiled.metadata.shared),
        "i32_tensor_muls": [line.strip() for line in ttir.splitlines() if _I32_TENSOR_MUL.search(line)],
        "narrow_addptr_offsets": [line.strip() for line in ttir.splitlines()
                                  if "tt.addptr" in line and (m := _ADDPTR.search(line)) and m.group(1) != "i64"],
    }


if __name__ == "__main__":
    from altlora_kernels.triton_runtime import interpreter_enabled

    assert not interpreter_enabled(), "ahead-of-time builds need TRITON_INTERPRET unset"
    for spec in json.load(sys.stdin):
        print(json.dumps(build(spec)), flush=True)
