#include "client/models.h"

#include <cmath>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "google/protobuf/struct.pb.h"
#include "google/protobuf/util/json_util.h"
#include "optd/v1/loadgen.pb.h"

namespace optd::loadgen {
namespace {

std::vector<TensorShape> Gpt2(int layers, int64_t d) {
  std::vector<TensorShape> t = {{"wte", {50257, d}, true}, {"wpe", {1024, d}, true}};
  for (int l = 0; l < layers; ++l) {
    const std::string p = absl::StrCat("h", l, ".");
    t.push_back({p + "ln_1.weight", {d}, true});
    t.push_back({p + "ln_1.bias", {d}, true});
    t.push_back({p + "attn.c_attn.weight", {3 * d, d}, false});
    t.push_back({p + "attn.c_attn.bias", {3 * d}, true});
    t.push_back({p + "attn.c_proj.weight", {d, d}, false});
    t.push_back({p + "attn.c_proj.bias", {d}, true});
    t.push_back({p + "ln_2.weight", {d}, true});
    t.push_back({p + "ln_2.bias", {d}, true});
    t.push_back({p + "mlp.c_fc.weight", {4 * d, d}, false});
    t.push_back({p + "mlp.c_fc.bias", {4 * d}, true});
    t.push_back({p + "mlp.c_proj.weight", {d, 4 * d}, false});
    t.push_back({p + "mlp.c_proj.bias", {d}, true});
  }
  t.push_back({"ln_f.weight", {d}, true});
  t.push_back({"ln_f.bias", {d}, true});
  return t;
}

// One decoder layer of Llama 3.2 1B: d 2048, 32 query and 8 key/value heads of 64, MLP 8192.
std::vector<TensorShape> LlamaLayer() {
  return {{"attention_norm.weight", {2048}, true}, {"wq.weight", {2048, 2048}, false},
          {"wk.weight", {512, 2048}, false},       {"wv.weight", {512, 2048}, false},
          {"wo.weight", {2048, 2048}, false},      {"ffn_norm.weight", {2048}, true},
          {"w1.weight", {8192, 2048}, false},      {"w3.weight", {8192, 2048}, false},
          {"w2.weight", {2048, 8192}, false}};
}

}  // namespace

int64_t Elements(const TensorShape& t) {
  int64_t n = 1;
  for (int64_t d : t.shape) n *= d;
  return n;
}

absl::StatusOr<std::vector<TensorShape>> ModelShapes(const std::string& model) {
  if (model == "gpt2-small") return Gpt2(12, 768);
  if (model == "gpt2-medium") return Gpt2(24, 1024);
  if (model == "llama-1b-layer") return LlamaLayer();
  std::ifstream in(model);
  if (!in) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--model=", model, ": not gpt2-small, gpt2-medium, llama-1b-layer or a readable file"));
  }
  std::stringstream text;
  text << in.rdbuf();
  std::string json = text.str();
  const size_t first = json.find_first_not_of(" \t\r\n");
  if (first != std::string::npos && json[first] == '[') {
    google::protobuf::ListValue list;
    if (!google::protobuf::util::JsonStringToMessage(json, &list).ok()) {
      return absl::InvalidArgumentError(absl::StrCat("--model=", model, ": not valid JSON"));
    }
    v1::LoadgenModel wrapped;
    for (int i = 0; i < list.values_size(); ++i) {
      const google::protobuf::Value& entry = list.values(i);
      if (entry.has_struct_value()) {
        // A list of tensors, as in {"tensors": [...]}.
        std::string one;
        (void)google::protobuf::util::MessageToJsonString(entry, &one);
        if (!google::protobuf::util::JsonStringToMessage(one, wrapped.add_tensors()).ok()) {
          return absl::InvalidArgumentError(
              absl::StrCat("--model=", model, ": entry ", i, " is not a tensor"));
        }
        continue;
      }
      // A list of shapes: lists of positive integers, named t0, t1, ...
      if (!entry.has_list_value() || entry.list_value().values().empty()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "--model=", model, ": entry ", i, " is neither a tensor nor a list of dimensions"));
      }
      v1::LoadgenModel::Tensor* t = wrapped.add_tensors();
      t->set_name(absl::StrCat("t", i));
      for (const google::protobuf::Value& d : entry.list_value().values()) {
        if (d.kind_case() != google::protobuf::Value::kNumberValue || d.number_value() < 1 ||
            d.number_value() != std::floor(d.number_value()) || d.number_value() > 1e12) {
          return absl::InvalidArgumentError(absl::StrCat(
              "--model=", model, ": entry ", i, " has a dimension that is not a positive integer"));
        }
        t->add_shape(static_cast<int64_t>(d.number_value()));
      }
    }
    json.clear();  // MessageToJsonString appends
    (void)google::protobuf::util::MessageToJsonString(wrapped, &json);
  }
  v1::LoadgenModel parsed;
  const auto status = google::protobuf::util::JsonStringToMessage(json, &parsed);
  if (!status.ok() || parsed.tensors().empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--model=", model,
                     ": expected {\"tensors\": [{\"name\": ..., \"shape\": [...]}, ...]}, a list "
                     "of such tensors, or a list of shapes [[768, 3072], ...]",
                     status.ok() ? "" : absl::StrCat(": ", status.ToString())));
  }
  std::vector<TensorShape> shapes;
  for (const auto& t : parsed.tensors()) {
    bool positive = !t.shape().empty();
    for (int64_t d : t.shape()) positive = positive && d > 0;
    if (t.name().empty() || !positive) {
      return absl::InvalidArgumentError(absl::StrCat("--model=", model, ": tensor '", t.name(),
                                                     "' needs a name and positive dimensions"));
    }
    TensorShape shape{t.name(), {t.shape().begin(), t.shape().end()}, t.adamw()};
    if (shape.shape.size() < 2) shape.adamw = true;
    shapes.push_back(std::move(shape));
  }
  return shapes;
}

std::string ModelJson(const std::vector<TensorShape>& shapes) {
  v1::LoadgenModel model;
  for (const TensorShape& t : shapes) {
    v1::LoadgenModel::Tensor* out = model.add_tensors();
    out->set_name(t.name);
    for (int64_t d : t.shape) out->add_shape(d);
    out->set_adamw(t.adamw);
  }
  google::protobuf::util::JsonPrintOptions print;
  print.always_print_primitive_fields = true;
  std::string json;
  (void)google::protobuf::util::MessageToJsonString(model, &json, print);  // no Any, no enums
  return json;
}

}  // namespace optd::loadgen
