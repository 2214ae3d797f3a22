// Session and admin tokens: generation, hashing, constant-time comparison, and the bearer
// metadata that carries them.
#ifndef OPTD_SERVER_AUTH_H_
#define OPTD_SERVER_AUTH_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace optd::server {

// 32 bytes from the OS CSPRNG (OpenSSL RAND_bytes), hex-encoded with the prefix "optd_".
// Internal when the generator fails.
absl::StatusOr<std::string> GenerateToken();

// SHA-256 of `token`, 32 raw bytes: what sessions and checkpoints keep instead of the token.
std::string TokenDigest(absl::string_view token);

// Compares two digests in time that depends only on their length.
bool DigestsEqual(absl::string_view a, absl::string_view b);

// The token of an `authorization` metadata value "Bearer <token>" (scheme case-insensitive).
// Unauthenticated when the value is empty or not a bearer credential.
absl::StatusOr<std::string> ParseBearer(absl::string_view authorization);

// The token in the file at `path`: its first line, without surrounding whitespace.
// InvalidArgument naming the file when it cannot be read or that line is empty.
absl::StatusOr<std::string> ReadTokenFile(const std::string& path);

// Random session names: "s-" and 16 hex characters.
absl::StatusOr<std::string> GenerateSessionId();

// `bytes` raw bytes from the OS CSPRNG. Internal when the generator fails.
absl::StatusOr<std::string> RandomBytes(int bytes);

}  // namespace optd::server

#endif  // OPTD_SERVER_AUTH_H_
