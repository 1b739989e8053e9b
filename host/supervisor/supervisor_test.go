package supervisor

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fakeNitroCLI is a nitro-cli that keeps one enclave's state in dir and
// records every call in dir/calls. Files that change its behaviour:
// fail-run (run-enclave fails as nitro-cli does when memory is short),
// fail-describe (describe-enclaves fails), leftover (an enclave of the
// supervisor's name is running before it starts), foreign (another
// enclave runs on CID 16).
const fakeNitroCLI = `#!/bin/sh
dir=$(dirname "$0")
echo "$*" >> "$dir/calls"
case $1 in
describe-enclaves)
	[ -f "$dir/hang-describe" ] && exec sleep 3600
	[ -f "$dir/fail-describe" ] && { echo "[ E36 ] Enclave process connection failure." >&2; exit 1; }
	printf '['
	sep=
	for f in "$dir"/enclave-*; do
		[ -f "$f" ] || continue
		printf '%s' "$sep"; cat "$f"; sep=,
	done
	printf ']\n'
	;;
run-enclave)
	[ -f "$dir/hang-run" ] && { sleep 3600; exit 0; }
	[ -f "$dir/fail-run" ] && { echo "[ E26 ] Insufficient memory requested. User provided memory is 512 MB, but based on the EIF file size, the minimum memory should be 1024 MB" >&2; exit 1; }
	n=$(ls "$dir" | grep -c '^enclave-')
	id="i-0123456789abcdef0-enc00000000000$n"
	while [ $# -gt 0 ]; do
		case $1 in --enclave-cid) cid=$2 ;; --enclave-name) name=$2 ;; esac
		shift
	done
	echo "Start allocating memory..."
	# Written whole, then renamed: killed at any point, the enclave is
	# either fully described or absent (an empty file would list nothing
	# yet count as running).
	printf '{"EnclaveName":"%s","EnclaveID":"%s","EnclaveCID":%s,"State":"RUNNING","Flags":"NONE"}' "$name" "$id" "$cid" > "$dir/.new-$id"
	mv "$dir/.new-$id" "$dir/enclave-$id"
	cat "$dir/enclave-$id"; echo
	;;
terminate-enclave)
	rm -f "$dir/enclave-$3"
	printf '{"EnclaveID":"%s","Terminated":true}\n' "$3"
	;;
*) echo "unknown command $1" >&2; exit 2 ;;
esac
`

type fixture struct {
	dir  string
	cfg  Config
	logs *observer.ObservedLogs
	log  *zap.Logger
	mu   sync.Mutex
	seen []string
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	dir := t.TempDir()
	cli := filepath.Join(dir, "nitro-cli")
	if err := os.WriteFile(cli, []byte(fakeNitroCLI), 0o755); err != nil {
		t.Fatal(err)
	}
	cfg := DefaultConfig()
	cfg.NitroCLI, cfg.EIF, cfg.Poll, cfg.Watchdog = cli, "/opt/nitrosign/nitrosign-enclave.eif", 20*time.Millisecond, 40*time.Millisecond
	core, logs := observer.New(zap.DebugLevel)
	return &fixture{dir: dir, cfg: cfg, logs: logs, log: zap.New(core)}
}

func (f *fixture) notify(s string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.seen = append(f.seen, s)
}

func (f *fixture) notified() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return strings.Join(f.seen, "|")
}

func (f *fixture) calls(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(f.dir, "calls"))
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	return string(b)
}

func (f *fixture) touch(t *testing.T, name, content string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(f.dir, name), []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func (f *fixture) enclaves(t *testing.T) []string {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(f.dir, "enclave-*"))
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func (f *fixture) run(t *testing.T, ctx context.Context) error {
	t.Helper()
	s, err := New(f.cfg, f.log, f.notify)
	if err != nil {
		t.Fatal(err)
	}
	return s.Run(ctx)
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// The whole loop: the enclave starts (READY), runs, dies on its own; Run
// fails so that systemd's Restart= starts a new one, which the next Run
// does.
func TestEnclaveGoneEndsRunWithAnError(t *testing.T) {
	f := newFixture(t)
	done := make(chan error, 1)
	go func() { done <- f.run(t, context.Background()) }()
	eventually(t, "the enclave running", func() bool { return len(f.enclaves(t)) == 1 })
	eventually(t, "READY=1, then a watchdog ping", func() bool {
		n := f.notified()
		i := strings.Index(n, "READY=1")
		return i >= 0 && strings.Contains(n[i:], "WATCHDOG=1")
	})
	if c := f.calls(t); !strings.Contains(c, "run-enclave --eif-path /opt/nitrosign/nitrosign-enclave.eif --cpu-count 2 --memory 512 --enclave-cid 16 --enclave-name nitrosign") {
		t.Fatalf("run-enclave called as %q", c)
	}
	// The signer exits: nitro-cli no longer lists the enclave.
	if err := os.Remove(f.enclaves(t)[0]); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if !errors.Is(err, ErrEnclaveGone) || !strings.Contains(err.Error(), "no longer listed") {
			t.Fatalf("Run = %v, want ErrEnclaveGone", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not notice the enclave was gone")
	}
	// systemd restarts the unit: a new Run starts a new enclave.
	ctx, cancel := context.WithCancel(context.Background())
	go func() { done <- f.run(t, ctx) }()
	eventually(t, "a new enclave running", func() bool { return strings.Count(f.notified(), "READY=1") == 2 })
	if n := len(f.enclaves(t)); n != 1 {
		t.Fatalf("%d enclaves after the restart, want 1", n)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run after stop = %v", err)
	}
}

// A stop while run-enclave is still booting the enclave leaves nothing
// running.
func TestStopWhileStarting(t *testing.T) {
	f := newFixture(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.run(t, ctx) }()
	eventually(t, "run-enclave called", func() bool { return strings.Contains(f.calls(t), "run-enclave") })
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run = %v", err)
	}
	if n := len(f.enclaves(t)); n != 0 {
		t.Fatalf("%d enclaves left running after a stop during start", n)
	}
}

// systemctl stop: the enclave is terminated and Run returns nil.
func TestStopTerminatesTheEnclave(t *testing.T) {
	f := newFixture(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.run(t, ctx) }()
	eventually(t, "READY=1", func() bool { return strings.Contains(f.notified(), "READY=1") })
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run = %v", err)
	}
	if n := len(f.enclaves(t)); n != 0 {
		t.Fatalf("%d enclaves left running after stop", n)
	}
	if !strings.Contains(f.notified(), "STOPPING=1") || !strings.Contains(f.calls(t), "terminate-enclave --enclave-id i-") {
		t.Fatalf("notified %q, calls %q", f.notified(), f.calls(t))
	}
}

// An enclave of our name left by a supervisor that died is terminated
// before the new one starts; one of another name on our CID is not ours:
// Run refuses, naming it.
func TestLeftovers(t *testing.T) {
	f := newFixture(t)
	f.touch(t, "enclave-i-old", `{"EnclaveName":"nitrosign","EnclaveID":"i-old","EnclaveCID":16,"State":"RUNNING","Flags":"NONE"}`)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.run(t, ctx) }()
	eventually(t, "READY=1", func() bool { return strings.Contains(f.notified(), "READY=1") })
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	c := f.calls(t)
	if i, j := strings.Index(c, "terminate-enclave --enclave-id i-old"), strings.Index(c, "run-enclave"); i < 0 || i > j {
		t.Fatalf("the leftover was not terminated before run-enclave: %q", c)
	}
	if f.logs.FilterMessage("terminating an enclave left by an earlier run").Len() != 1 {
		t.Error("no warning about the leftover enclave")
	}

	g := newFixture(t)
	g.touch(t, "enclave-i-theirs", `{"EnclaveName":"other","EnclaveID":"i-theirs","EnclaveCID":16,"State":"RUNNING","Flags":"NONE"}`)
	err := g.run(t, context.Background())
	if err == nil || !strings.Contains(err.Error(), `CID 16 is taken by enclave i-theirs (name "other")`) {
		t.Fatalf("Run beside a foreign enclave on our CID = %v", err)
	}
	if strings.Contains(g.calls(t), "terminate-enclave") || strings.Contains(g.calls(t), "run-enclave") {
		t.Fatalf("the foreign enclave was touched: %q", g.calls(t))
	}
}

// A nitro-cli that hangs is killed at the command timeout: starting fails,
// and watching fails after three polls without an answer.
func TestHangingNitroCLI(t *testing.T) {
	f := newFixture(t)
	f.cfg.CommandTimeout = 300 * time.Millisecond
	f.touch(t, "hang-run", "")
	start := time.Now()
	err := f.run(t, context.Background())
	if err == nil || !strings.Contains(err.Error(), "no answer within 300ms") {
		t.Fatalf("Run with run-enclave hanging = %v", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("Run took %v beside a hanging run-enclave", d)
	}

	g := newFixture(t)
	g.cfg.PollTimeout = 300 * time.Millisecond
	done := make(chan error, 1)
	go func() { done <- g.run(t, context.Background()) }()
	eventually(t, "READY=1", func() bool { return strings.Contains(g.notified(), "READY=1") })
	g.touch(t, "hang-describe", "")
	// The watchdog goes on while nitro-cli hangs: systemd must not kill a
	// supervisor that is only waiting for it.
	pings := strings.Count(g.notified(), "WATCHDOG=1")
	eventually(t, "watchdog pings during the hang", func() bool { return strings.Count(g.notified(), "WATCHDOG=1") > pings+3 })
	select {
	case err := <-done:
		if !errors.Is(err, ErrEnclaveGone) || !strings.Contains(err.Error(), "no answer") {
			t.Fatalf("Run with describe-enclaves hanging = %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run went on while nitro-cli hung")
	}
}

// nitro-cli's own message reaches the error: the operator sees why.
func TestFailuresSayWhy(t *testing.T) {
	f := newFixture(t)
	f.touch(t, "fail-run", "")
	err := f.run(t, context.Background())
	if err == nil || !strings.Contains(err.Error(), "start the enclave") || !strings.Contains(err.Error(), "Insufficient memory requested") {
		t.Fatalf("Run with run-enclave failing = %v", err)
	}

	g := newFixture(t)
	done := make(chan error, 1)
	go func() { done <- g.run(t, context.Background()) }()
	eventually(t, "READY=1", func() bool { return strings.Contains(g.notified(), "READY=1") })
	g.touch(t, "fail-describe", "")
	select {
	case err := <-done:
		if !errors.Is(err, ErrEnclaveGone) || !strings.Contains(err.Error(), "E36") {
			t.Fatalf("Run with describe-enclaves failing = %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run went on while nitro-cli could not tell the enclave's state")
	}
	if g.logs.FilterMessage("nitro-cli describe-enclaves failed").Len() < 2 {
		t.Error("the failed polls were not logged")
	}

	h := newFixture(t)
	h.cfg.NitroCLI = filepath.Join(h.dir, "missing-nitro-cli")
	if err := h.run(t, context.Background()); err == nil || !strings.Contains(err.Error(), "missing-nitro-cli") {
		t.Fatalf("Run without nitro-cli = %v", err)
	}
}

// A stop while leftovers are being looked at ends what may be half
// terminated and returns nil (systemctl stop is not a failure).
func TestStopWhileCheckingLeftovers(t *testing.T) {
	f := newFixture(t)
	f.touch(t, "enclave-i-old", `{"EnclaveName":"nitrosign","EnclaveID":"i-old","EnclaveCID":16,"State":"RUNNING","Flags":"NONE"}`)
	f.touch(t, "hang-describe", "")
	f.cfg.PollTimeout = 2 * time.Second
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.run(t, ctx) }()
	eventually(t, "describe-enclaves called", func() bool { return strings.Contains(f.calls(t), "describe-enclaves") })
	_ = os.Remove(filepath.Join(f.dir, "hang-describe"))
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run stopped while checking leftovers = %v", err)
	}
	if n := len(f.enclaves(t)); n != 0 {
		t.Fatalf("%d enclaves left", n)
	}
}

func TestConfigValidate(t *testing.T) {
	if err := (Config{}).Validate(); err == nil {
		t.Fatal("zero Config validated")
	}
	c := DefaultConfig()
	c.CID, c.CPUCount, c.MemoryMiB = 3, 0, 10
	err := c.Validate()
	for _, want := range []string{"EIF: none given", "CID 3", "CPU count 0", "memory 10 MiB"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Validate = %v, want %q", err, want)
		}
	}
}
