// The optd binary in a child process, for tests that kill and restart daemons.
#ifndef OPTD_TESTS_SERVER_DAEMON_PROCESS_H_
#define OPTD_TESTS_SERVER_DAEMON_PROCESS_H_

#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "client/client.h"

namespace optd::testing {

// `binary` started with `flags` and --port_file=`port_file`; waits until it serves (the port file
// is written once the server listens). Killed with SIGKILL when destroyed.
class DaemonProcess {
 public:
  DaemonProcess(const std::string& binary, std::string port_file, std::vector<std::string> flags)
      : port_file_(std::move(port_file)) {
    unlink(port_file_.c_str());
    std::vector<std::string> args = {binary, absl::StrCat("--port_file=", port_file_)};
    for (std::string& f : flags) args.push_back(std::move(f));
    pid_ = fork();
    if (pid_ == 0) {
      std::vector<char*> argv;
      for (std::string& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      execv(argv[0], argv.data());
      _exit(127);
    }
    for (int i = 0; i < 1000 && port_ == 0; ++i) {
      std::ifstream in(port_file_);
      if (!(in >> port_)) port_ = 0;
      if (port_ == 0) absl::SleepFor(absl::Milliseconds(10));
    }
    EXPECT_NE(port_, 0) << binary << " did not start";
  }
  DaemonProcess(const DaemonProcess&) = delete;
  DaemonProcess& operator=(const DaemonProcess&) = delete;
  ~DaemonProcess() {
    if (pid_ > 0) Kill(SIGKILL);
  }

  int port() const { return port_; }
  pid_t pid() const { return pid_; }
  std::string address() const { return absl::StrCat("127.0.0.1:", port_); }
  client::Client Connect() const {
    client::ChannelOptions options;
    options.target = address();
    return client::Client(*client::MakeChannel(options));
  }

  // Sends `signal` and returns the exit status (or -signal).
  int Kill(int signal) {
    kill(pid_, signal);
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
  }

 private:
  pid_t pid_ = -1;
  int port_ = 0;
  std::string port_file_;
};

// A loopback port nothing listens on now, for a daemon that must come back on the same address
// after a restart (the kernel hands out ephemeral ports in turn, so it stays free meanwhile).
inline int FreeLoopbackPort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t size = sizeof(address);
  int port = 0;
  if (bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&address), &size) == 0) {
    port = ntohs(address.sin_port);
  }
  close(fd);
  EXPECT_NE(port, 0) << "no free loopback port";
  return port;
}

}  // namespace optd::testing

#endif  // OPTD_TESTS_SERVER_DAEMON_PROCESS_H_
