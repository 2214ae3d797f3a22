// A session's optimizer state outside the daemon (optd.v1's ExportState and ImportState): the
// header that describes it, and an import checked and assembled piece by piece into a fresh
// optimizer, so that a session takes it whole or not at all (Session::ImportState).
//
// Records: per tensor its parameters (buffer "") and each state buffer its optimizer has
// (Optimizer::state), in little-endian fp32.
#ifndef OPTD_SERVER_STATE_TRANSFER_H_
#define OPTD_SERVER_STATE_TRANSFER_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/backend.h"
#include "kernels/optimizer.h"
#include "optd/v1/optd.pb.h"
#include "server/hyperparams.h"
#include "server/session_checkpoint.h"

namespace optd::server {

// The header of `optimizer`'s state at `step` in a session of `config` with `hyperparams`
// (every group), its parameters among the records when `parameters`.
v1::StateHeader StateHeaderOf(const v1::SessionConfig& config, int64_t step,
                              const HyperparamTable& hyperparams, const Optimizer& optimizer,
                              bool parameters);

// One import into a session of `config` (named `session_id` in errors). Not thread-safe: one
// stream fills it.
class StateImport {
 public:
  // Checks `header` against the session: the same tensors by name, each of the same shape and
  // group preset (so the same state buffers, of the same sizes), every group's hyperparameters
  // with every field set, the parameters included, steps >= 0. Then allocates the optimizer the
  // records go into, on `backend`. InvalidArgument naming what does not fit.
  static absl::StatusOr<std::unique_ptr<StateImport>> Begin(Backend& backend,
                                                            const std::string& session_id,
                                                            const v1::SessionConfig& config,
                                                            const v1::StateHeader& header);

  // Writes one chunk into its record. InvalidArgument, naming the record, for an unknown tensor
  // or buffer, an offset that is not where the record's last chunk ended, data that is no whole
  // number of fp32 values or runs past the record, a value that is not finite, or a negative
  // second moment.
  absl::Status Add(const v1::StateChunk& chunk);

  // The imported state (optimizer, step, hyperparameters), once every record is complete;
  // InvalidArgument naming the first incomplete one, or hyperparameters that do not validate.
  absl::StatusOr<SessionState> Finish();

  int64_t bytes_received() const { return bytes_received_; }

  // `done` runs when the import is destroyed, committed or not (the session's one-import slot).
  void OnEnd(std::function<void()> done) { on_end_ = std::move(done); }
  ~StateImport() {
    if (on_end_) on_end_();
  }
  StateImport(const StateImport&) = delete;
  StateImport& operator=(const StateImport&) = delete;

 private:
  struct Record {
    int tensor = 0;
    int64_t elements = 0;
    int64_t received = 0;
    bool non_negative = false;  // a second moment
  };

  StateImport() = default;

  std::string session_id_;
  const v1::SessionConfig* config_ = nullptr;
  std::map<std::pair<std::string, std::string>, Record> records_;  // (tensor, buffer)
  SessionState state_;
  std::vector<int64_t> steps_applied_;
  std::vector<float> values_;
  int64_t bytes_received_ = 0;
  std::function<void()> on_end_;
};

}  // namespace optd::server

#endif  // OPTD_SERVER_STATE_TRANSFER_H_
