// Test certificates made with the openssl command: a CA, a server certificate for
// 127.0.0.1/localhost, client certificates from the same CA and from an unrelated one.
#ifndef OPTD_TESTS_SERVER_CERTIFICATES_H_
#define OPTD_TESTS_SERVER_CERTIFICATES_H_

#include <cstdlib>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "tests/server/test_daemon.h"

namespace optd::testing {

// A CA, a server certificate for 127.0.0.1/localhost, a client certificate from the same CA and
// one from an unrelated CA, all made with the openssl command.
class Certificates {
 public:
  Certificates() : dir_(MakeTempDir("tls")) {
    std::ofstream(dir_ + "/server.ext") << "subjectAltName=DNS:localhost,IP:127.0.0.1\n";
    std::ofstream(dir_ + "/client.ext") << "extendedKeyUsage=clientAuth\n";
    ok_ = MakeCa("ca") && MakeCa("rogue") && MakeSigned("server", "ca", "server.ext") &&
          MakeSigned("client", "ca", "client.ext") && MakeSigned("intruder", "rogue", "client.ext");
  }
  bool ok() const { return ok_; }
  std::string path(const std::string& name) const { return dir_ + "/" + name; }

 private:
  bool Run(const std::string& command) {
    return std::system(absl::StrCat("cd ", dir_, " && ", command, " >/dev/null 2>&1").c_str()) == 0;
  }
  static std::string NewKey(const std::string& name) {
    return absl::StrCat("-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ", name,
                        ".key");
  }
  bool MakeCa(const std::string& name) {
    return Run(absl::StrCat("openssl req -x509 ", NewKey(name), " -out ", name,
                            ".pem -days 2 -subj /CN=optd-test-", name));
  }
  bool MakeSigned(const std::string& name, const std::string& ca, const std::string& ext) {
    return Run(absl::StrCat("openssl req ", NewKey(name), " -out ", name,
                            ".csr -subj /CN=", name)) &&
           Run(absl::StrCat("openssl x509 -req -in ", name, ".csr -CA ", ca, ".pem -CAkey ", ca,
                            ".key -CAcreateserial -out ", name, ".pem -days 2 -extfile ", ext));
  }

  std::string dir_;
  bool ok_ = false;
};

}  // namespace optd::testing

#endif  // OPTD_TESTS_SERVER_CERTIFICATES_H_
