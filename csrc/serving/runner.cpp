// ik_serve: score a batch with an AOTInductor package of interest_kernels, no Python.
//
//   ik_serve PACKAGE ENTRY INPUT OUTPUT [--ops LIBRARY] [--repeat N] [--device cpu|cuda]
//
// PACKAGE is written by `python -m interest_kernels.export`; ENTRY is "score" or
// "candidates" (the package's model names). INPUT holds that entry point's tensors, in
// its argument order, in the tensor file format of csrc/serving/README.md
// (interest_kernels.export.write_tensors writes it); OUTPUT receives one float32 tensor
// named "scores". LIBRARY, when given, is dlopen'ed first: the project's operator library
// (libinterest_kernels_ops.so, or the Python extension's _C*.so), which registers the
// interest_kernels:: operators that a package may call. --repeat runs the batch N times
// and prints the latency of each run in microseconds (the first includes warm-up).
// --device cuda moves the inputs to the GPU, for a package exported with --device cuda
// (which embeds its kernels and needs no --ops).
#include <dlfcn.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

namespace {

constexpr char kMagic[8] = {'I', 'K', 'T', 'E', 'N', 'S', 'O', 'R'};

struct Named {
  std::string name;
  at::Tensor tensor;
};

template <typename T>
T read_pod(std::istream& in, const std::string& path) {
  T value;
  if (!in.read(reinterpret_cast<char*>(&value), sizeof(T))) {
    throw std::runtime_error(path + ": truncated tensor file");
  }
  return value;
}

std::vector<Named> read_tensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  char magic[8];
  if (!in.read(magic, 8) || std::memcmp(magic, kMagic, 8) != 0) {
    throw std::runtime_error(path + ": not a tensor file (no IKTENSOR header)");
  }
  const auto count = read_pod<uint32_t>(in, path);
  std::vector<Named> out;
  for (uint32_t i = 0; i < count; ++i) {
    const auto name_len = read_pod<uint32_t>(in, path);
    std::string name(name_len, '\0');
    if (!in.read(name.data(), name_len)) throw std::runtime_error(path + ": truncated name");
    const auto code = read_pod<uint32_t>(in, path);
    const auto ndim = read_pod<uint32_t>(in, path);
    if (code > 1) throw std::runtime_error(path + ": " + name + " has an unknown dtype code");
    std::vector<int64_t> sizes(ndim);
    for (auto& s : sizes) s = read_pod<int64_t>(in, path);
    auto tensor = torch::empty(sizes, code == 0 ? torch::kInt64 : torch::kFloat32);
    const auto nbytes = static_cast<std::streamsize>(tensor.numel() * tensor.element_size());
    if (!in.read(static_cast<char*>(tensor.data_ptr()), nbytes)) {
      throw std::runtime_error(path + ": truncated data of " + name);
    }
    out.push_back({name, tensor});
  }
  return out;
}

template <typename T>
void write_pod(std::ostream& out, T value) {
  out.write(reinterpret_cast<const char*>(&value), sizeof(T));
}

void write_tensors(const std::string& path, const std::vector<Named>& tensors) {
  std::ofstream out(path, std::ios::binary);
  if (!out) throw std::runtime_error("cannot write " + path);
  out.write(kMagic, 8);
  write_pod<uint32_t>(out, tensors.size());
  for (const auto& [name, t] : tensors) {
    auto c = t.to(torch::kCPU).contiguous();
    if (c.scalar_type() != torch::kFloat32 && c.scalar_type() != torch::kInt64) {
      throw std::runtime_error(name + ": only float32 and int64 tensors can be written");
    }
    write_pod<uint32_t>(out, name.size());
    out.write(name.data(), static_cast<std::streamsize>(name.size()));
    write_pod<uint32_t>(out, c.scalar_type() == torch::kInt64 ? 0 : 1);
    write_pod<uint32_t>(out, c.dim());
    for (auto s : c.sizes()) write_pod<int64_t>(out, s);
    out.write(static_cast<const char*>(c.data_ptr()), static_cast<std::streamsize>(c.numel() * c.element_size()));
  }
  if (!out) throw std::runtime_error("writing " + path + " failed");
}

int usage() {
  std::cerr << "usage: ik_serve PACKAGE ENTRY INPUT OUTPUT [--ops LIBRARY] [--repeat N] [--device cpu|cuda]\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) return usage();
  const std::string package = argv[1], entry = argv[2], input = argv[3], output = argv[4];
  int repeat = 1;
  std::string device = "cpu";  // where the package's inputs live: a CUDA package takes CUDA tensors
  for (int i = 5; i < argc; i += 2) {
    const std::string flag = argv[i];
    if (i + 1 >= argc) return usage();
    if (flag == "--ops") {
      if (dlopen(argv[i + 1], RTLD_NOW | RTLD_GLOBAL) == nullptr) {
        std::cerr << "ik_serve: cannot load the operator library " << argv[i + 1] << ": " << dlerror() << "\n";
        return 1;
      }
    } else if (flag == "--device") {
      device = argv[i + 1];
      if (device != "cpu" && device != "cuda") return usage();
    } else if (flag == "--repeat") {
      repeat = std::stoi(argv[i + 1]);
      if (repeat < 1) return usage();
    } else {
      return usage();
    }
  }
  try {
    torch::NoGradGuard no_grad;
    torch::inductor::AOTIModelPackageLoader loader(package, entry);
    std::vector<at::Tensor> inputs;
    for (auto& named : read_tensors(input)) inputs.push_back(named.tensor.to(torch::Device(device)));
    std::vector<at::Tensor> outputs;
    for (int r = 0; r < repeat; ++r) {
      const auto start = std::chrono::steady_clock::now();
      outputs = loader.run(inputs);
      const auto us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start);
      if (repeat > 1) std::cout << "run_us " << us.count() << "\n";
    }
    if (outputs.size() != 1) throw std::runtime_error("the package returned " + std::to_string(outputs.size()) + " outputs, expected 1");
    write_tensors(output, {{"scores", outputs[0]}});
  } catch (const std::exception& e) {
    std::cerr << "ik_serve: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
