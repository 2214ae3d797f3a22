// Which of a step's results are final, so that the stream of the worker whose gradients
// completed the step sends each tensor's result as soon as it is, while the commit computes the
// rest (early results, Session::Step): the results of tensors stepped ahead (step_pipeline.h)
// and of tensors without a gradient are final once the step's gradients have passed every check,
// the others as each batch finishes. The reader takes tensors in the order they became final.
#ifndef OPTD_SERVER_RESULT_PROGRESS_H_
#define OPTD_SERVER_RESULT_PROGRESS_H_

#include <cstddef>
#include <optional>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace optd::server {

class ResultProgress {
 public:
  ResultProgress() = default;
  ResultProgress(const ResultProgress&) = delete;
  ResultProgress& operator=(const ResultProgress&) = delete;

  // A new step's `num_tensors` results, none final. REQUIRES: no reader.
  void Reset(int num_tensors);
  // Tensor `tensor`'s result is final; a tensor already final (or out of range) is ignored.
  void Ready(int tensor);
  // The step is done: OK, every result final (those not marked Ready come after the others, in
  // tensor order), or `status`, why the step failed after its first results were final. The first
  // call counts.
  void Finish(absl::Status status);

  // The `i`th result to become final (i counts from 0), waiting until it is: its tensor, nullopt
  // once every tensor was taken (i == num_tensors), or the step's failure when it failed before.
  absl::StatusOr<std::optional<int>> Next(size_t i) const;
  // The tensors final so far, in the order they became so.
  std::vector<int> final_so_far() const;

 private:
  mutable absl::Mutex mu_;
  std::vector<int> order_ ABSL_GUARDED_BY(mu_);
  std::vector<char> ready_ ABSL_GUARDED_BY(mu_);
  bool done_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status status_ ABSL_GUARDED_BY(mu_);
};

}  // namespace optd::server

#endif  // OPTD_SERVER_RESULT_PROGRESS_H_
