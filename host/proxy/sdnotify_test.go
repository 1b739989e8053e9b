package proxy_test

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/fx"
	"go.uber.org/fx/fxtest"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/nitrosign/nitrosign/host/pool/pooltest"
	"github.com/nitrosign/nitrosign/host/proxy"
)

// Under systemd (a fake NOTIFY_SOCKET here) the binary's graph says
// READY=1 only once the enclave is reachable, and STOPPING=1 on stop.
func TestSystemdReadyWaitsForUpstream(t *testing.T) {
	dir, err := os.MkdirTemp("", "sdn") // short: socket paths are limited to 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: filepath.Join(dir, "notify"), Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	msgs := make(chan string, 100)
	done := make(chan struct{})
	go func() {
		defer close(done)
		b := make([]byte, 4096)
		for {
			n, err := sock.Read(b)
			if err != nil {
				return
			}
			msgs <- string(b[:n])
		}
	}()
	t.Cleanup(func() { sock.Close(); <-done })
	t.Setenv("NOTIFY_SOCKET", filepath.Join(dir, "notify"))
	t.Setenv("WATCHDOG_USEC", "")

	u := pooltest.Start(t)
	u.Stop() // the enclave is not there yet
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg := proxy.DefaultConfig()
	cfg.Upstreams = []string{u.Target().String()}
	cfg.Pool.Size = 2
	app := fxtest.New(t,
		proxy.Options(cfg),
		fx.Provide(func() net.Listener { return l }),
		fx.Decorate(func() *zap.Logger { return zaptest.NewLogger(t) }),
	)
	app.RequireStart()
	wait := func(want string) string {
		t.Helper()
		var seen []string
		deadline := time.After(10 * time.Second)
		for {
			select {
			case m := <-msgs:
				if strings.Contains(m, want) {
					return m
				}
				if strings.Contains(m, "READY=1") {
					t.Fatalf("READY=1 before %q: %q", want, m)
				}
				seen = append(seen, m)
			case <-deadline:
				t.Fatalf("no %q; got %q", want, seen)
			}
		}
	}
	wait("STATUS=0/2 upstream connections ready")
	select {
	case m := <-msgs:
		if strings.Contains(m, "READY=1") {
			t.Fatalf("READY=1 with the upstream down: %q", m)
		}
	case <-time.After(300 * time.Millisecond):
	}
	u.Restart()
	if m := wait("READY=1"); !strings.Contains(m, "upstream connections ready") {
		t.Fatalf("READY datagram %q has no status", m)
	}
	app.RequireStop()
	wait("STOPPING=1")
}
