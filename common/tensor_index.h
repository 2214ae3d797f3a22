// The tensors of a session or an optimizer by name: the one name -> index lookup the daemon, the
// staging and the kernels share.
#ifndef OPTD_COMMON_TENSOR_INDEX_H_
#define OPTD_COMMON_TENSOR_INDEX_H_

#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/string_view.h"

namespace optd {

class TensorIndex {
 public:
  // REQUIRES: the names are distinct (a validated config's are).
  explicit TensorIndex(std::vector<std::string> names);

  int size() const { return static_cast<int>(names_.size()); }
  const std::string& name(int tensor) const { return names_[tensor]; }
  const std::vector<std::string>& names() const { return names_; }
  // The index of `name`, or -1 when there is no such tensor.
  int Find(absl::string_view name) const;

 private:
  std::vector<std::string> names_;
  absl::flat_hash_map<std::string, int> index_;
};

}  // namespace optd

#endif  // OPTD_COMMON_TENSOR_INDEX_H_
