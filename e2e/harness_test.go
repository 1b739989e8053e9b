// Package e2e runs the real binaries over real AF_VSOCK loopback (CID 1):
// the enclave signer listening on vsock, the host proxy from a TCP port to
// it, and the client hitting both ends. `make e2e` builds the binaries and
// runs this suite natively where the kernel has vsock_loopback, or inside a
// qemu micro-VM where it does not (scripts/e2e.sh).
package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mdlayher/vsock"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/nitrosign/nitrosign/host/client"
)

// binDir holds nitrosign-enclave, nitrosign-proxy and nitrosign.
var binDir = os.Getenv("NITROSIGN_BIN_DIR")

// scale stretches every timeout: the suite runs under TCG emulation in CI,
// 20-40x slower than native.
var scale = func() time.Duration {
	if os.Getenv("NITROSIGN_E2E_SLOW") == "0" {
		return 1
	}
	return 5
}()

func TestMain(m *testing.M) {
	if binDir == "" {
		fmt.Println("e2e: NITROSIGN_BIN_DIR is not set: run the suite with `make e2e`, which builds the binaries and provides real vsock loopback (natively or in a micro-VM)")
		os.Exit(0)
	}
	if err := probeLoopback(); err != nil {
		fmt.Printf("e2e: no vsock loopback here (%v): run `make e2e`, which boots a micro-VM with vsock_loopback when the kernel lacks it\n", err)
		os.Exit(1)
	}
	os.Exit(m.Run())
}

func probeLoopback() error {
	l, err := vsock.ListenContextID(vsock.Local, 0, nil)
	if err != nil {
		return err
	}
	return l.Close()
}

// syncBuffer collects a process's output for assertions and failure logs.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// proc is a running binary.
type proc struct {
	name string
	cmd  *exec.Cmd
	out  *syncBuffer
	done chan struct{}
	err  error
}

// start runs bin with args; at cleanup it is killed if still running, and
// its output is logged when the test failed.
func start(t *testing.T, bin string, args ...string) *proc {
	t.Helper()
	p := &proc{name: bin, out: &syncBuffer{}, done: make(chan struct{})}
	p.cmd = exec.Command(filepath.Join(binDir, bin), args...)
	p.cmd.Stdout = p.out
	p.cmd.Stderr = p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", bin, err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.kill()
		if t.Failed() {
			t.Logf("---- output of %s %s ----\n%s", bin, strings.Join(args, " "), tail(p.out.String(), 60))
		}
	})
	return p
}

func tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func (p *proc) kill() {
	select {
	case <-p.done:
	default:
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

func (p *proc) signal(sig syscall.Signal) { _ = p.cmd.Process.Signal(sig) }

// wait returns the exit code, or fails the test after timeout.
func (p *proc) wait(t *testing.T, timeout time.Duration) int {
	t.Helper()
	select {
	case <-p.done:
		return p.cmd.ProcessState.ExitCode()
	case <-time.After(timeout):
		t.Fatalf("%s did not exit within %s", p.name, timeout)
		return -1
	}
}

// logLines returns the JSON log lines of p with the given message.
func (p *proc) logLines(msg string) []map[string]any {
	var out []map[string]any
	sc := bufio.NewScanner(strings.NewReader(p.out.String()))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var m map[string]any
		if json.Unmarshal(sc.Bytes(), &m) == nil && m["msg"] == msg {
			out = append(out, m)
		}
	}
	return out
}

// vsockPort picks a port for one test's enclave; tests in this package run
// one after another, but a previous enclave may linger for a moment.
func vsockPort() uint32 { return 20000 + rand.Uint32N(20000) }

// vsockPorts picks n distinct ports for one test's services.
func vsockPorts(n int) []uint32 {
	seen := map[uint32]bool{}
	out := make([]uint32, 0, n)
	for len(out) < n {
		if p := vsockPort(); !seen[p] {
			seen[p] = true
			out = append(out, p)
		}
	}
	return out
}

// tcpAddr returns a free loopback TCP address.
func tcpAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

type enclave struct {
	*proc
	port   uint32
	target string
}

// startEnclave runs the enclave on vsock CID 1 and waits until it serves.
func startEnclave(t *testing.T, port uint32, extra ...string) *enclave {
	t.Helper()
	args := append([]string{"--cid", "1", "--port", fmt.Sprint(port), "--dev-simulated-nsm", "--dev-allow-anonymous", "--audit-ship", ""}, extra...)
	e := &enclave{proc: start(t, "nitrosign-enclave", args...), port: port, target: fmt.Sprintf("vsock://1:%d", port)}
	waitServing(t, e.target, e.proc)
	return e
}

type proxy struct {
	*proc
	addr   string
	target string
}

func startProxy(t *testing.T, upstream string, poolSize int, extra ...string) *proxy {
	t.Helper()
	addr := tcpAddr(t)
	args := append([]string{"--listen", addr, "--upstream", upstream, "--pool-size", fmt.Sprint(poolSize)}, extra...)
	p := &proxy{proc: start(t, "nitrosign-proxy", args...), addr: addr, target: "tcp://" + addr}
	waitServing(t, p.target, p.proc)
	return p
}

// waitServing polls grpc.health.v1 on target until SERVING.
func waitServing(t *testing.T, target string, p *proc) {
	t.Helper()
	deadline := time.Now().Add(12 * time.Second * scale)
	for time.Now().Before(deadline) {
		select {
		case <-p.done:
			t.Fatalf("%s exited before serving: %v\n%s", p.name, p.err, tail(p.out.String(), 40))
		default:
		}
		if serving(target) {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("%s not SERVING on %s within %s", p.name, target, 12*time.Second*scale)
}

func serving(target string) bool {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second*scale)
	defer cancel()
	c, err := client.Dial(ctx, target, client.Options{})
	if err != nil {
		return false
	}
	defer c.Close()
	resp, err := c.Health.Check(ctx, &healthpb.HealthCheckRequest{})
	return err == nil && resp.GetStatus() == healthpb.HealthCheckResponse_SERVING
}

// dial connects a client to target with n connections.
func dial(t *testing.T, target string, n int) *client.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second*scale)
	defer cancel()
	c, err := client.Dial(ctx, target, client.Options{Connections: n})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func callCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second*scale)
	t.Cleanup(cancel)
	return ctx
}

// cli runs the nitrosign CLI binary and returns its stdout.
func cli(t *testing.T, stdin string, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(filepath.Join(binDir, "nitrosign"), args...)
	cmd.Stdin = strings.NewReader(stdin)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if err != nil {
		return out.String(), fmt.Errorf("nitrosign %s: %v: %s", strings.Join(args, " "), err, errb.String())
	}
	return out.String(), nil
}
