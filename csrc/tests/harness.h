// A minimal unit-test harness: IK_TEST registers a test, IK_CHECK* fail it with the
// file, line and expression; ik_test::run_all() runs every test and returns the number
// of failures (the process exit status that ctest reads).
#pragma once

#include <cstdio>
#include <exception>
#include <functional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace ik_test {

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline std::vector<std::pair<std::string, std::function<void()>>>& registry() {
  static std::vector<std::pair<std::string, std::function<void()>>> tests;
  return tests;
}

struct Registrar {
  Registrar(const char* name, std::function<void()> fn) { registry().emplace_back(name, std::move(fn)); }
};

inline std::string where(const char* file, int line, const std::string& what) {
  std::ostringstream out;
  out << file << ":" << line << ": " << what;
  return out.str();
}

inline int run_all() {
  int failed = 0;
  for (const auto& [name, fn] : registry()) {
    try {
      fn();
      std::printf("[ OK ] %s\n", name.c_str());
    } catch (const std::exception& e) {
      ++failed;
      std::printf("[FAIL] %s\n       %s\n", name.c_str(), e.what());
    }
  }
  std::printf("%zu tests, %d failed\n", registry().size(), failed);
  return failed == 0 ? 0 : 1;
}

}  // namespace ik_test

#define IK_TEST(name)                                                    \
  static void name();                                                    \
  static const ik_test::Registrar ik_registrar_##name(#name, &name);     \
  static void name()

#define IK_CHECK(cond)                                                             \
  do {                                                                             \
    if (!(cond)) throw ik_test::Failure(ik_test::where(__FILE__, __LINE__, #cond)); \
  } while (0)

// `expr` must throw an exception of type `type` whose what() contains `text`.
#define IK_CHECK_THROWS(type, expr, text)                                                     \
  do {                                                                                        \
    bool ik_thrown = false;                                                                   \
    try {                                                                                     \
      expr;                                                                                   \
    } catch (const type& e) {                                                                 \
      ik_thrown = true;                                                                       \
      if (std::string(e.what()).find(text) == std::string::npos)                             \
        throw ik_test::Failure(ik_test::where(                                               \
            __FILE__, __LINE__, std::string("message lacks '") + (text) + "': " + e.what())); \
    }                                                                                         \
    if (!ik_thrown)                                                                           \
      throw ik_test::Failure(ik_test::where(__FILE__, __LINE__, "did not throw: " #expr));    \
  } while (0)
