#!/bin/bash
# Copy mamba-ssm's selective-scan CUDA sources, forward AND backward, out of a git copy of state-spaces/mamba into
# DEST (git-ignored, e.g. .baselines/mamba_ss_bwd; third-party sources are never committed), trimmed so the
# backward compiles in a few minutes: float32 and bfloat16 inputs, real weights, B and C varying with time (our
# layout), no z gate.
# The build refuses other calls (TORCH_CHECK) rather than running a kernel it did not compile.
# Usage: benchmarks/prep_mamba_ss_bwd.sh MIRROR_GIT_DIR DEST
set -euo pipefail
R=$1; D=$2; rm -rf "$D"; mkdir -p "$D"
for f in $(git -C "$R" ls-tree -r HEAD --name-only csrc/selective_scan | grep -v "_complex.cu"); do
  git -C "$R" show "HEAD:$f" > "$D/$(basename "$f")"
done
python3 - "$D" <<'PY'
import sys, pathlib
d = pathlib.Path(sys.argv[1])
k = d / "selective_scan_bwd_kernel.cuh"; s = k.read_text()
# fixed switches: B and C vary with time, no z (4x fewer instantiations per dtype)
s = s.replace("BOOL_SWITCH(params.is_variable_B, kIsVariableB,", "FIXED_SWITCH(true, kIsVariableB,")
s = s.replace("BOOL_SWITCH(params.is_variable_C, kIsVariableC,", "FIXED_SWITCH(true, kIsVariableC,")
s = s.replace("BOOL_SWITCH(params.z_ptr != nullptr , kHasZ,", "FIXED_SWITCH(false, kHasZ,")
assert s.count("FIXED_SWITCH") == 3, "mamba-ssm's backward launch changed: update this recipe"
s = s.replace('#include "static_switch.h"', '#include "static_switch.h"\n#define FIXED_SWITCH(VAL, NAME, ...) [&] { constexpr bool NAME = VAL; return __VA_ARGS__(); }()')
k.write_text(s)
c = d / "selective_scan.cpp"; s = c.read_text()
old = 'DISPATCH_WTYPE_FLOAT_AND_COMPLEX(A.scalar_type(), "selective_scan_bwd", [&] {\n            selective_scan_bwd_cuda<input_t, weight_t>(params, stream);\n        });'
assert old in s, "mamba-ssm's binding changed: update this recipe"
s = s.replace(old, 'TORCH_CHECK(A.scalar_type() == at::ScalarType::Float && is_variable_B && is_variable_C && !has_z,\n'
              '                    "this trimmed build has the backward for real A, time-varying B and C, no z only");\n'
              '        using weight_t = float;\n        selective_scan_bwd_cuda<input_t, weight_t>(params, stream);')
# no float16: its branch of the input-type dispatch raises instead of calling kernels this build does not compile
import re
half = re.compile(r"        using input_t = at::Half; *\\\n        __VA_ARGS__\(\); *\\")
assert len(half.findall(s)) == 1, "mamba-ssm's input-type dispatch changed: update this recipe"
s = half.sub(lambda m: '        AT_ERROR(#NAME, " float16 is not in this trimmed build"); \\', s)
c.write_text(s)
(d / "build.py").write_text('''"""JIT-build mamba-ssm's selective scan, forward and (trimmed) backward, for sm_90 and return the extension.
ext.fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus) -> [out, x(, out_z)]
ext.bwd(u, delta, A, B, C, D, z, delta_bias, dout, x, out, dz, delta_softplus, recompute_out_z)
  -> [du, ddelta, dA, dB, dC, dD, ddelta_bias]
u, delta, dout: (batch, dim, len); A: (dim, n) float32; B, C: (batch, groups, n, len) in u's dtype."""
import os
from torch.utils.cpp_extension import load

def build(verbose=False):
    c = os.path.dirname(os.path.abspath(__file__))
    nv = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math",
          "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
          "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
          "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
          "-gencode", "arch=compute_90,code=sm_90", "--threads", "4"]
    srcs = ["selective_scan.cpp"] + [f"selective_scan_fwd_{t}.cu" for t in ("fp32", "bf16")] + \\
           [f"selective_scan_bwd_{t}_real.cu" for t in ("fp32", "bf16")]
    return load("mamba_selective_scan_fwdbwd", [os.path.join(c, s) for s in srcs],
                extra_cflags=["-O3", "-std=c++17"], extra_cuda_cflags=nv, verbose=verbose)
''')
PY
