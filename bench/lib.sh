# What the benchmark scripts share; sourced from the repository root.
#
#   bench_init NAME      the build tree ($OPTD_BENCH_BUILD_DIR, default build), bench/out, and
#                        log() prefixed with bench/NAME
#   bench_build TARGET…  installs what is missing, configures a Release tree with the benchmarks
#                        and builds TARGET…
#   bench_repetitions N "$@"
#                        the script's one option, --repetitions=N (default N), into
#                        $repetitions; anything else prints its usage and exits 2

bench_init() {
  bench_name=$1
  build_dir=${OPTD_BENCH_BUILD_DIR:-build}
  out=bench/out
  mkdir -p "$out"
}

log() { echo "bench/$bench_name: $*" >&2; }

bench_build() {
  scripts/install-deps
  cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DOPTD_BUILD_BENCH=ON >"$out/configure.log"
  cmake --build "$build_dir" --target "$@" -j"$(nproc)"
}

bench_repetitions() {
  repetitions=$1
  shift
  for arg in "$@"; do
    case $arg in
      --repetitions=*) repetitions=${arg#--repetitions=} ;;
      *) echo "usage: bench/$bench_name [--repetitions=N]" >&2; exit 2 ;;
    esac
  done
}
