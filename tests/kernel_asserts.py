"""The one comparison every kernel test uses (STYLE.md, item 9): max-abs error relative to the reference's largest
entry, printed with the relative RMS error; complex tensors are compared over their real and imaginary parts."""
import torch


def assert_close(name, ref, out, ratio):
    "Fail unless `out` has no NaN (an element never written) and its max error relative to max |ref| is <= `ratio`."
    ref, out = torch.as_tensor(ref), torch.as_tensor(out)
    if ref.is_complex():
        ref, out = torch.view_as_real(ref), torch.view_as_real(out.to(ref.dtype))
    ref, out = ref.double(), out.double()
    err = (ref - out).abs().max().item()
    rel = err / max(ref.abs().max().item(), 1e-30)
    rms = ((ref - out).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()
    print(f"{name}: max-abs {err:.2e}, max-rel {rel:.2e}, rel-rms {rms:.2e}")
    assert not torch.isnan(out).any(), f"{name}: NaN in the output (an element was never written)"
    assert rel <= ratio, f"{name}: max-rel error {rel:.2e} > {ratio:.0e}"
