// The placement function on cases whose answer is worked out by hand: LPT order and balance,
// batch slices, the memory cap, the fingerprint, and bad manifests.
#include "client/placement.h"

#include <gtest/gtest.h>

#include <map>
#include <string>

#include "absl/strings/str_cat.h"

namespace optd::client {
namespace {

using Tensor = v1::PlacementManifest::Tensor;

v1::PlacementManifest Manifest(int endpoints, int64_t memory = 0) {
  v1::PlacementManifest m;
  for (int e = 0; e < endpoints; ++e) {
    auto* endpoint = m.add_endpoints();
    endpoint->set_address(absl::StrCat("optd-", e));
    endpoint->set_memory_bytes(memory);
  }
  return m;
}

Tensor* Add(v1::PlacementManifest& m, const std::string& name, std::vector<int64_t> shape) {
  Tensor* t = m.add_tensors();
  t->set_name(name);
  for (int64_t d : shape) t->add_shape(d);
  return t;
}

std::map<std::string, int> Owners(const v1::Placement& p) {
  std::map<std::string, int> owners;
  for (const auto& item : p.items()) {
    owners[item.first() > 0 ? absl::StrCat(item.tensor(), "#", item.first()) : item.tensor()] =
        item.endpoint();
  }
  return owners;
}

TEST(PlacementTest, LongestFirstOntoTheLeastLoaded) {
  // NS costs 5·m·n·min(m, n), in units of 5·64³: a 128×128 is 8, b 64×128 is 2, c and d 64×64
  // are 1 each. LPT on 2 instances: a→0, b→1, c→1 (2 < 8), d→1 (3 < 8): loads 8 and 4.
  v1::PlacementManifest m = Manifest(2);
  Add(m, "c", {64, 64});
  Add(m, "a", {128, 128});
  Add(m, "b", {64, 128});
  Add(m, "d", {64, 64});
  Add(m, "bias", {100});
  absl::StatusOr<v1::Placement> p = Place(m);
  ASSERT_TRUE(p.ok()) << p.status();
  const int64_t unit = 5 * 64 * 64 * 64;
  EXPECT_EQ(p->items(0).tensor(), "a");
  EXPECT_EQ(p->items(0).cost(), 8 * unit);
  const auto owners = Owners(*p);
  EXPECT_EQ(owners.at("a"), 0);
  EXPECT_EQ(owners.at("b"), 1);
  EXPECT_EQ(owners.at("c"), 1);
  EXPECT_EQ(owners.at("d"), 1);
  EXPECT_EQ(p->newton_schulz_cost(0), 8 * unit);
  EXPECT_EQ(p->newton_schulz_cost(1), 4 * unit);
  // The bias (AdamW, by bytes) goes where the fewest bytes are; both hold 16384·12, and the tie
  // goes to the smaller Newton–Schulz load, instance 1.
  EXPECT_EQ(owners.at("bias"), 1);
  EXPECT_EQ(p->items(4).bytes(), 100 * kOtherStateBytes);
}

TEST(PlacementTest, BatchSlicesSpreadAndTheMemoryCapHolds) {
  v1::PlacementManifest m = Manifest(3);
  Tensor* experts = Add(m, "experts", {6, 32, 16});
  experts->set_batch(true);
  absl::StatusOr<v1::Placement> p = Place(m);
  ASSERT_TRUE(p.ok()) << p.status();
  ASSERT_EQ(p->items_size(), 6);
  for (int e = 0; e < 3; ++e) EXPECT_EQ(p->newton_schulz_cost(e), 2 * 5 * 32 * 16 * 16);
  // Room for two slices each: a seventh slice cannot go anywhere.
  m = Manifest(3, 2 * 32 * 16 * kNewtonSchulzStateBytes);
  Add(m, "experts", {7, 32, 16})->set_batch(true);
  p = Place(m);
  EXPECT_EQ(p.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(p.status().message().find("tensor 'experts' slice 6"), absl::string_view::npos)
      << p.status();
}

TEST(PlacementTest, AFunctionOfTheManifestAndItsEpoch) {
  v1::PlacementManifest m = Manifest(3);
  for (int i = 0; i < 20; ++i) Add(m, absl::StrCat("w", i), {64 + 8 * (i % 5), 96});
  m.set_epoch(4);
  const v1::Placement first = *Place(m);
  v1::PlacementManifest reordered = Manifest(3);
  for (int i = 19; i >= 0; --i) Add(reordered, absl::StrCat("w", i), {64 + 8 * (i % 5), 96});
  reordered.set_epoch(4);
  EXPECT_EQ(Place(reordered)->fingerprint(), first.fingerprint());
  m.set_epoch(5);
  EXPECT_NE(Place(m)->fingerprint(), first.fingerprint());
  EXPECT_EQ(Place(m)->epoch(), 5);
}

TEST(PlacementTest, BadManifestsAreInvalidArgument) {
  v1::PlacementManifest none;
  EXPECT_EQ(Place(none).status().code(), absl::StatusCode::kInvalidArgument);
  v1::PlacementManifest m = Manifest(2);
  Add(m, "w", {4, 4});
  Add(m, "w", {4, 4});
  EXPECT_EQ(Place(m).status().code(), absl::StatusCode::kInvalidArgument);
  m = Manifest(2);
  Add(m, "w", {4, 0});
  EXPECT_EQ(Place(m).status().code(), absl::StatusCode::kInvalidArgument);
  m = Manifest(2);
  Add(m, "w", {4, 4})->set_batch(true);
  EXPECT_EQ(Place(m).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace optd::client
