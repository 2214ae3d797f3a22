#include "common/tensor_index.h"

#include <utility>

namespace optd {

TensorIndex::TensorIndex(std::vector<std::string> names) : names_(std::move(names)) {
  index_.reserve(names_.size());
  for (int t = 0; t < size(); ++t) index_.emplace(names_[t], t);
}

int TensorIndex::Find(absl::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? -1 : it->second;
}

}  // namespace optd
