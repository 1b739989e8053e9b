package e2e

import (
	"fmt"
	"syscall"
	"testing"
	"time"
)

// The enclave's log lines reach the proxy over real vsock and come out in
// the proxy's own log with their fields: the enclave ships from its first
// line (queued until the proxy listens), the proxy receives on
// --enclave-log-port. Then the enclave is stopped: its last lines, why it
// stopped, arrive too.
func TestEnclaveLogsReachTheProxy(t *testing.T) {
	logPort := vsockPort()
	e := startEnclave(t, vsockPort(), "--log-ship", fmt.Sprintf("vsock://1:%d", logPort))
	p := startProxy(t, e.target, 1, "--enclave-log-port", fmt.Sprint(logPort))
	shipped := func(msg string) map[string]any {
		for _, m := range p.logLines(msg) {
			if m["logger"] == "enclave.server" {
				return m
			}
		}
		return nil
	}
	deadline := time.Now().Add(15 * time.Second * scale)
	for shipped("serving") == nil {
		if time.Now().After(deadline) {
			t.Fatalf("the enclave's \"serving\" line never reached the proxy's log:\n%s", tail(p.out.String(), 30))
		}
		time.Sleep(50 * time.Millisecond)
	}
	m := shipped("serving")
	if m["enclave_cid"] != float64(1) || m["addr"] == nil || m["enclave_ts"] == nil || m["level"] != "info" {
		t.Fatalf("shipped line without the enclave's fields: %v", m)
	}
	t.Logf("in the proxy's log: %v", m)

	e.signal(syscall.SIGTERM)
	if code := e.wait(t, 30*time.Second*scale); code != 0 {
		t.Fatalf("enclave exit status %d", code)
	}
	deadline = time.Now().Add(10 * time.Second * scale)
	for shipped("drained") == nil {
		if time.Now().After(deadline) {
			t.Fatalf("the enclave's last lines never reached the proxy's log:\n%s", tail(p.out.String(), 30))
		}
		time.Sleep(50 * time.Millisecond)
	}
}
