// What optd's libFuzzer targets share: the input as a file (the readers under test take paths).
#ifndef OPTD_TESTS_FUZZ_FUZZ_UTIL_H_
#define OPTD_TESTS_FUZZ_FUZZ_UTIL_H_

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <fstream>
#include <string>

namespace optd::fuzz {

// `data` written whole to a file of this process's own (in /dev/shm when there is one).
inline const std::string& WriteInput(const uint8_t* data, size_t size) {
  static const std::string path = [] {
    const std::string dir = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    return dir + "/optd_fuzz_" + std::to_string(getpid());
  }();
  std::ofstream(path, std::ios::binary | std::ios::trunc)
      .write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  return path;
}

}  // namespace optd::fuzz

#endif  // OPTD_TESTS_FUZZ_FUZZ_UTIL_H_
