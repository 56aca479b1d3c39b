// Reads a problem (header + raw arrays) from argv[1], runs the SDC launchers on the CPU emulator,
// writes output, grad_input, grad_guidance, grad_weight, grad_bias to argv[2].
#include "segops/cuda/semantic_difference_conv2d.h"
#include <fstream>
#include <vector>
#include <iostream>
using namespace segops::cuda;
int main(int argc, char** argv) {
  std::ifstream in(argv[1], std::ios::binary);
  int64_t h[12];
  in.read((char*)h, sizeof h);
  double sigma; in.read((char*)&sigma, 8);
  SdcGeometry g;
  g.dtype = (DType)h[0]; g.similarity = (int)h[1]; g.N = h[2]; g.Cin = h[3]; g.Cg = h[4]; g.Cout = h[5];
  g.H = h[6]; g.W = h[7]; g.k = h[8]; g.dilation = h[9]; const bool has_bias = h[10]; g.sigma = sigma;
  const size_t es = g.dtype == DType::kFloat64 ? 8 : g.dtype == DType::kFloat32 ? 4 : 2;
  auto rd = [&](int64_t n) { std::vector<char> v(n * es); in.read(v.data(), v.size()); return v; };
  const int64_t nu = g.N * g.Cin * g.H * g.W, nv = g.N * g.Cg * g.H * g.W, nw = g.Cout * g.Cin * g.k * g.k,
                ny = g.N * g.Cout * g.H * g.W;
  auto U = rd(nu), V = rd(nv), Wt = rd(nw), B = rd(g.Cout), G = rd(ny);
  std::vector<char> Y(ny * es), dU(nu * es, 1), dV(nv * es, 1), dW(nw * es, 1), dB(g.Cout * es, 1);
  SdcForwardParams f; f.g = g; f.input = U.data(); f.guidance = V.data(); f.weight = Wt.data();
  f.bias = has_bias ? B.data() : nullptr; f.output = Y.data();
  std::vector<char> wsf(semantic_difference_conv2d_forward_workspace_bytes(f) + 1);
  f.workspace = wsf.data();
  int e1 = semantic_difference_conv2d_forward(f, nullptr);
  SdcBackwardParams b; b.g = g; b.grad_out = G.data(); b.input = U.data(); b.guidance = V.data(); b.weight = Wt.data();
  b.grad_input = dU.data(); b.grad_guidance = dV.data(); b.grad_weight = dW.data(); b.grad_bias = dB.data();
  size_t wsb_bytes = semantic_difference_conv2d_backward_workspace_bytes(b);
  std::vector<char> wsb(wsb_bytes + 1, 7);  // garbage-filled
  b.workspace = wsb.data();
  int e2 = semantic_difference_conv2d_backward(b, nullptr);
  std::cerr << "fwd err " << e1 << " bwd err " << e2 << " ws " << wsb_bytes << "\n";
  std::ofstream out(argv[2], std::ios::binary);
  for (auto* v : {&Y, &dU, &dV, &dW, &dB}) out.write(v->data(), v->size());
  return e1 || e2;
}
