// A deliberate data race: scripts/sanitize --thread checks that ThreadSanitizer and
// scripts/tsan-triage report it as optd's before it trusts a clean run.
#include <thread>

namespace optd {
int shared_counter = 0;
void Bump() {
  for (int i = 0; i < 1000; ++i) ++shared_counter;
}
}  // namespace optd

int main() {
  std::thread a(optd::Bump), b(optd::Bump);
  a.join();
  b.join();
  return optd::shared_counter > 0 ? 0 : 1;
}
