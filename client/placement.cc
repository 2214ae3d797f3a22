#include "client/placement.h"

#include <algorithm>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"

namespace optd::client {
namespace {

using Tensor = v1::PlacementManifest::Tensor;

struct Item {
  std::string tensor;
  int64_t first, count;
  bool newton_schulz;
  int64_t cost, bytes;
};

// FNV-1a, 64 bits, over bytes.
void Fnv(uint64_t& hash, const void* data, size_t size) {
  const auto* bytes = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < size; ++i) {
    hash ^= bytes[i];
    hash *= 1099511628211ull;
  }
}

void FnvInt(uint64_t& hash, int64_t value) {
  unsigned char bytes[8];
  for (int i = 0; i < 8; ++i)
    bytes[i] = static_cast<unsigned char>(static_cast<uint64_t>(value) >> (8 * i));
  Fnv(hash, bytes, 8);
}

}  // namespace

absl::StatusOr<v1::Placement> Place(const v1::PlacementManifest& manifest) {
  const int endpoints = manifest.endpoints_size();
  if (endpoints == 0) return absl::InvalidArgumentError("placement: no endpoints");
  std::vector<Item> items;
  std::set<std::string> names;
  for (const Tensor& t : manifest.tensors()) {
    if (t.name().empty()) return absl::InvalidArgumentError("placement: a tensor has no name");
    if (!names.insert(t.name()).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("placement: tensor '", t.name(), "' is repeated"));
    }
    int64_t elements = 1;
    for (int64_t d : t.shape()) {
      if (d <= 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("placement: tensor '", t.name(), "' has an empty dimension"));
      }
      elements *= d;
    }
    const int rank = t.shape_size();
    const bool newton_schulz =
        t.kind() == Tensor::NEWTON_SCHULZ || (t.kind() == Tensor::KIND_UNSPECIFIED && rank >= 2);
    if (t.batch() && rank < 3) {
      return absl::InvalidArgumentError(absl::StrCat("placement: tensor '", t.name(),
                                                     "' is batched but has rank ", rank, " (< 3)"));
    }
    if (!newton_schulz) {
      items.push_back(
          {t.name(), 0, 1, false, elements * kOtherStateBytes, elements * kOtherStateBytes});
      continue;
    }
    const int64_t steps = t.ns_steps() > 0 ? t.ns_steps() : 5;
    int64_t m, n, slices = 1;
    if (t.batch()) {
      m = t.shape(rank - 2);
      n = t.shape(rank - 1);
      slices = elements / (m * n);
    } else {
      m = rank >= 1 ? t.shape(0) : 1;
      n = elements / m;
    }
    const int64_t cost = steps * m * n * std::min(m, n);
    for (int64_t s = 0; s < slices; ++s) {
      items.push_back(
          {t.name(), t.batch() ? s : 0, 1, true, cost, m * n * kNewtonSchulzStateBytes});
    }
  }
  // Newton–Schulz work first, largest first; then the rest by bytes, largest first. Ties go by
  // name and slice, so the order is a function of the manifest alone.
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
    return std::make_tuple(!a.newton_schulz, -a.cost, a.tensor, a.first) <
           std::make_tuple(!b.newton_schulz, -b.cost, b.tensor, b.first);
  });
  v1::Placement placement;
  placement.set_epoch(manifest.epoch());
  std::vector<int64_t> cost(endpoints, 0), bytes(endpoints, 0);
  uint64_t fingerprint = 14695981039346656037ull;
  FnvInt(fingerprint, manifest.epoch());
  for (const Item& item : items) {
    // The least loaded instance (Newton–Schulz cost for NS work, bytes for the rest; then
    // bytes; then the lower index) that still has memory for it.
    int best = -1;
    for (int e = 0; e < endpoints; ++e) {
      const int64_t limit = manifest.endpoints(e).memory_bytes();
      if (limit > 0 && bytes[e] + item.bytes > limit) continue;
      if (best < 0) {
        best = e;
        continue;
      }
      const auto key = [&](int i) {
        return item.newton_schulz ? std::make_pair(cost[i], bytes[i])
                                  : std::make_pair(bytes[i], cost[i]);
      };
      if (key(e) < key(best)) best = e;
    }
    if (best < 0) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "placement: no instance has ", item.bytes, " bytes left for tensor '", item.tensor, "'",
          item.first > 0 ? absl::StrCat(" slice ", item.first) : ""));
    }
    if (item.newton_schulz) cost[best] += item.cost;
    bytes[best] += item.bytes;
    v1::Placement::Item* out = placement.add_items();
    out->set_tensor(item.tensor);
    out->set_first(item.first);
    out->set_count(item.count);
    out->set_endpoint(best);
    out->set_cost(item.cost);
    out->set_bytes(item.bytes);
    Fnv(fingerprint, item.tensor.data(), item.tensor.size());
    FnvInt(fingerprint, item.first);
    FnvInt(fingerprint, item.count);
    FnvInt(fingerprint, best);
  }
  for (int e = 0; e < endpoints; ++e) {
    placement.add_newton_schulz_cost(cost[e]);
    placement.add_bytes(bytes[e]);
  }
  placement.set_fingerprint(fingerprint);
  return placement;
}

}  // namespace optd::client
