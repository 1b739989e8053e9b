package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// External gRPC clients against the proxy over vsock: grpcurl lists the
// enclave's services by reflection and signs; grpc-health-probe checks the
// proxy and, by service name, the enclave behind it.
func TestRealGRPCClients(t *testing.T) {
	for _, tool := range []string{"grpcurl", "grpc-health-probe"} {
		if _, err := os.Stat(filepath.Join(binDir, tool)); err != nil {
			t.Skipf("%s is not in NITROSIGN_BIN_DIR: run the suite with `make e2e`, which installs it", tool)
		}
	}
	e := startEnclave(t, vsockPort())
	p := startProxy(t, e.target, 2)
	run := func(tool string, args ...string) string {
		t.Helper()
		out, err := exec.Command(filepath.Join(binDir, tool), args...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s %s: %v\n%s", tool, strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	list := run("grpcurl", "-plaintext", p.addr, "list")
	for _, svc := range []string{"nitrosign.v1.SignerService", "nitrosign.v1.EchoService", "nitrosign.v1.AttestationService", "grpc.health.v1.Health"} {
		if !strings.Contains(list, svc) {
			t.Fatalf("grpcurl list through the proxy lacks %s:\n%s", svc, list)
		}
	}
	sig := run("grpcurl", "-plaintext", "-d", `{"key":{"key_type":"KEY_TYPE_ECC"},"message":"aGVsbG8="}`, p.addr, "nitrosign.v1.SignerService/Sign")
	if !strings.Contains(sig, `"signature"`) || !strings.Contains(sig, "SIGNING_ALGORITHM_ECDSA_SHA_256") {
		t.Fatalf("grpcurl Sign: %s", sig)
	}
	out, err := exec.Command(filepath.Join(binDir, "grpcurl"), "-plaintext", "-d", `{"key":{"key_type":"KEY_TYPE_ECC"},"message":"aGVsbG8=","signing_algorithm":"SIGNING_ALGORITHM_RSASSA_PSS_SHA_256"}`, p.addr, "nitrosign.v1.SignerService/Sign").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "InvalidArgument") {
		t.Fatalf("grpcurl Sign with a mismatched algorithm: %v\n%s", err, out)
	}
	for _, args := range [][]string{{"-addr", p.addr}, {"-addr", p.addr, "-service", "nitrosign.v1.SignerService"}} {
		if out := run("grpc-health-probe", args...); !strings.Contains(out, "SERVING") {
			t.Fatalf("grpc-health-probe %v: %s", args, out)
		}
	}
}
