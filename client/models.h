// The model catalogue optd-loadgen and the benchmarks step: the tensors of GPT-2 small and medium,
// of one Llama 3.2 1B layer, or of a JSON file.
#ifndef OPTD_CLIENT_MODELS_H_
#define OPTD_CLIENT_MODELS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace optd::loadgen {

struct TensorShape {
  std::string name;
  std::vector<int64_t> shape;
  bool adamw = false;  // embeddings, norms, biases: the AdamW group
};

// The tensors of `model`: "gpt2-small" (124,439,808 parameters, head tied to the embedding),
// "gpt2-medium" (354,823,168), "llama-1b-layer" (one decoder layer of Llama 3.2 1B, 60,821,504),
// or a JSON file: a LoadgenModel ({"tensors": [...]}), a list of its tensors, or a list of shapes
// ([[768, 3072], [3072], ...], named t0, t1, ...). InvalidArgument for anything else.
absl::StatusOr<std::vector<TensorShape>> ModelShapes(const std::string& model);

// `shapes` as a LoadgenModel in JSON, which ModelShapes reads back.
std::string ModelJson(const std::vector<TensorShape>& shapes);

// The elements of one tensor.
int64_t Elements(const TensorShape& t);

}  // namespace optd::loadgen

#endif  // OPTD_CLIENT_MODELS_H_
