#include "server/auth.h"

#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <openssl/sha.h>

#include <fstream>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace optd::server {
absl::StatusOr<std::string> RandomBytes(int bytes) {
  std::string raw(static_cast<size_t>(bytes), '\0');
  if (RAND_bytes(reinterpret_cast<unsigned char*>(raw.data()), bytes) != 1) {
    return absl::InternalError("the random number generator failed (RAND_bytes)");
  }
  return raw;
}

namespace {

absl::StatusOr<std::string> RandomHex(int bytes) {
  OPTD_ASSIGN_OR_RETURN(std::string raw, RandomBytes(bytes));
  return absl::BytesToHexString(raw);
}

}  // namespace

absl::StatusOr<std::string> GenerateToken() {
  absl::StatusOr<std::string> hex = RandomHex(32);
  if (!hex.ok()) return hex.status();
  return absl::StrCat("optd_", *hex);
}

absl::StatusOr<std::string> GenerateSessionId() {
  absl::StatusOr<std::string> hex = RandomHex(8);
  if (!hex.ok()) return hex.status();
  return absl::StrCat("s-", *hex);
}

std::string TokenDigest(absl::string_view token) {
  std::string digest(SHA256_DIGEST_LENGTH, '\0');
  SHA256(reinterpret_cast<const unsigned char*>(token.data()), token.size(),
         reinterpret_cast<unsigned char*>(digest.data()));
  return digest;
}

bool DigestsEqual(absl::string_view a, absl::string_view b) {
  return a.size() == b.size() && CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

absl::StatusOr<std::string> ParseBearer(absl::string_view authorization) {
  if (authorization.empty()) {
    return absl::UnauthenticatedError("missing 'authorization: Bearer <token>' metadata");
  }
  constexpr absl::string_view kScheme = "bearer ";
  if (authorization.size() <= kScheme.size() ||
      !absl::StartsWithIgnoreCase(authorization, kScheme)) {
    return absl::UnauthenticatedError("the authorization metadata is not 'Bearer <token>'");
  }
  return std::string(absl::StripAsciiWhitespace(authorization.substr(kScheme.size())));
}

absl::StatusOr<std::string> ReadTokenFile(const std::string& path) {
  std::ifstream file(path);
  std::string line;
  if (!file || !std::getline(file, line)) {
    return absl::InvalidArgumentError(absl::StrCat("cannot read a token from '", path, "'"));
  }
  const std::string token(absl::StripAsciiWhitespace(line));
  if (token.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("the first line of '", path, "' is empty"));
  }
  return token;
}

}  // namespace optd::server
