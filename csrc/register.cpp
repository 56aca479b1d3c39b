// Schemas of the fused kernels behind segops's Python custom ops (library `segops_C`).
// Kernels register their implementations next to their code (csrc/cpu/<op>.cpp for CPU,
// csrc/cuda/<op>.cpp for the CUDA kernels of csrc/cuda/<op>.cu). The public ops `segops::<name>` (with fakes,
// autograd and backend dispatch) are defined in Python, in segops/ops/<name>.py.
#include <torch/library.h>

TORCH_LIBRARY(segops_C, m) {
  // One block per operator; each op's forward returns what its backward needs.

  // semantic_difference_conv2d (SPEC 2.4): the backward recomputes the weighted differences.
  m.def("semantic_difference_conv2d_forward(Tensor input, Tensor guidance, Tensor weight, "
        "Tensor? bias, int dilation, str similarity, float sigma) -> Tensor");
  m.def("semantic_difference_conv2d_backward(Tensor grad_out, Tensor input, Tensor guidance, "
        "Tensor weight, int dilation, str similarity, float sigma) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // qco (qco_1d with grid 1 and cooc false, qco_2d with cooc true): forward ->
  // (hist, levels, sim, rnorm, mean, stats), see segops/ops/qco.py; texture_reconstruct saves
  // nothing beyond its inputs.
  m.def("qco_forward(Tensor x, int num_levels, int grid, bool cooc) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("qco_backward(Tensor grad_hist, Tensor grad_levels, Tensor? grad_sim, Tensor x, "
        "Tensor hist, Tensor sim, Tensor rnorm, Tensor mean, Tensor stats, int num_levels, "
        "int grid, bool cooc) -> Tensor");
  m.def("texture_reconstruct_forward(Tensor sim, Tensor levels, Tensor features) -> Tensor");
  m.def("texture_reconstruct_backward(Tensor grad_out, Tensor sim, Tensor levels, "
        "Tensor features) -> (Tensor, Tensor, Tensor)");
  // disentangled_non_local (docs/operators.md §2.3): flattened (N, C, L) inputs, s = scale / temperature;
  // forward returns (out, lse (N, Lq), g (N, Cv), lse_u (N,)); backward (dq, dk, dv, du).
  m.def("disentangled_non_local_forward(Tensor query, Tensor key, Tensor value, Tensor? unary, "
        "bool whiten, float s) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("disentangled_non_local_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, "
        "Tensor? unary, Tensor out, Tensor lse, Tensor g, Tensor lse_u, bool whiten, float s) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // criss_cross_attention: forward -> (out, stats); stats (N, 2, H, W) holds the softmax max and
  // log-sum per position, in the dtype of the inputs (fp32 for fp32, fp64 for fp64).
  m.def("criss_cross_attention_forward(Tensor query, Tensor key, Tensor value) -> (Tensor, Tensor)");
  m.def("criss_cross_attention_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, "
        "Tensor out, Tensor stats) -> (Tensor, Tensor, Tensor)");
  // interlaced_sparse_attention: forward returns (out, lse (N, H, W), fp32; fp64 for fp64 inputs).
  // bias (nb, L, L) and mask (nm, L, L) are optional additive logits; the backward returns
  // (grad_query, grad_key, grad_value, grad_bias), grad_bias of shape (0,) without a bias.
  m.def("interlaced_sparse_attention_forward(Tensor query, Tensor key, Tensor value, "
        "Tensor? bias, Tensor? mask, int ph, int pw, bool long_range, float scale) "
        "-> (Tensor, Tensor)");
  m.def("interlaced_sparse_attention_backward(Tensor grad_out, Tensor query, Tensor key, "
        "Tensor value, Tensor? bias, Tensor? mask, Tensor out, Tensor lse, int ph, int pw, "
        "bool long_range, float scale) -> (Tensor, Tensor, Tensor, Tensor)");
}
