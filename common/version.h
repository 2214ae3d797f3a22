// optd's release, the same for every binary (--version) and for the optd_build_info metric.
#ifndef OPTD_COMMON_VERSION_H_
#define OPTD_COMMON_VERSION_H_

namespace optd {

inline constexpr char kOptdVersion[] = OPTD_VERSION;  // the CMake project's VERSION

}  // namespace optd

#endif  // OPTD_COMMON_VERSION_H_
