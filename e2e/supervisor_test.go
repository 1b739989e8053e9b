package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// fakeNitroCLI stands in for nitro-cli where there is no Nitro hypervisor:
// its "enclave" is the signer run as a process on vsock loopback, listed by
// describe-enclaves while that process lives (a zombie counts as gone).
const fakeNitroCLI = `#!/bin/sh
dir=%[1]s
alive() { [ -f "$dir/pid" ] && pid=$(cat "$dir/pid") && [ -d /proc/$pid ] && ! grep -q '^State:.*Z' /proc/$pid/status; }
desc() { printf '{"EnclaveName":"nitrosign","EnclaveID":"i-e2e-enc%%s","EnclaveCID":16,"State":"RUNNING","Flags":"NONE"}' "$1"; }
case $1 in
describe-enclaves)
	if alive; then printf '['; desc "$pid"; printf ']\n'; else echo '[]'; fi
	;;
run-enclave)
	%[2]s/nitrosign-enclave --cid 1 --port %[3]d --dev-simulated-nsm --dev-allow-anonymous --audit-ship "" --log-ship "" >>"$dir/enclave.log" 2>&1 &
	echo $! >"$dir/pid"
	echo "Start allocating memory..."
	desc $!; echo
	;;
terminate-enclave)
	alive && kill "$pid"
	rm -f "$dir/pid"
	echo '{"Terminated":true}'
	;;
*) echo "unknown command $1" >&2; exit 2 ;;
esac
`

// The supervisor loop with the signer as a process: the supervisor starts
// it, the proxy serves through it; the signer is killed; the supervisor
// notices and exits 1; started again (as systemd's Restart= does), it
// starts a new signer, and the proxy recovers by itself; SIGTERM ends both.
func TestSupervisedSignerRestartedAfterAKill(t *testing.T) {
	dir := t.TempDir()
	port := vsockPort()
	cli := filepath.Join(dir, "nitro-cli")
	if err := os.WriteFile(cli, []byte(fmt.Sprintf(fakeNitroCLI, dir, binDir, port)), 0o755); err != nil {
		t.Fatal(err)
	}
	signerPID := func() int {
		b, err := os.ReadFile(filepath.Join(dir, "pid"))
		if err != nil {
			return 0
		}
		pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
		return pid
	}
	t.Cleanup(func() {
		if pid := signerPID(); pid > 0 {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	})
	supervise := func() *proc {
		return start(t, "nitrosign-supervisor", "--eif", filepath.Join(dir, "nitrosign-enclave.eif"), "--cid", "16",
			"--nitro-cli", cli, "--poll", "300ms", "--command-timeout", (30 * time.Second * scale).String())
	}
	target := fmt.Sprintf("vsock://1:%d", port)
	sup := supervise()
	waitServing(t, target, sup)
	if len(sup.logLines("enclave running")) != 1 {
		t.Fatalf("no \"enclave running\" line:\n%s", tail(sup.out.String(), 20))
	}
	p := startProxy(t, target, 2)
	c := dial(t, p.target, 1)
	ecc := &pb.KeySelector{Selector: &pb.KeySelector_KeyType{KeyType: pb.KeyType_KEY_TYPE_ECC}}
	if _, err := c.Signer.Sign(callCtx(t), &pb.SignRequest{Key: ecc, Message: []byte("before")}); err != nil {
		t.Fatal(err)
	}

	// The signer dies.
	first := signerPID()
	killed := time.Now()
	if err := syscall.Kill(first, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	code := sup.wait(t, 30*time.Second*scale)
	noticed := time.Since(killed)
	if code != 1 {
		t.Fatalf("supervisor exit status %d after the signer died, want 1:\n%s", code, tail(sup.out.String(), 20))
	}
	if len(sup.logLines("the enclave is gone: exiting so that systemd starts it again")) != 1 {
		t.Fatalf("the supervisor did not say why it exits:\n%s", tail(sup.out.String(), 20))
	}

	// Restart=: a new supervisor, a new signer; the proxy finds it alone.
	sup = supervise()
	deadline := time.Now().Add(60 * time.Second * scale)
	for {
		_, err := c.Signer.Sign(callCtx(t), &pb.SignRequest{Key: ecc, Message: []byte("after")})
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no Sign through the proxy after the restart: %v\nsupervisor:\n%s", err, tail(sup.out.String(), 20))
		}
		time.Sleep(200 * time.Millisecond)
	}
	second := signerPID()
	if second == 0 || second == first {
		t.Fatalf("signer pid %d after the restart (first %d)", second, first)
	}
	t.Logf("signer killed: the supervisor exited 1 after %v; with a new supervisor, Sign through the proxy again %v after the kill",
		noticed.Round(time.Millisecond), time.Since(killed).Round(time.Millisecond))

	// systemctl stop: the signer is terminated, the supervisor exits 0.
	sup.signal(syscall.SIGTERM)
	if code := sup.wait(t, 30*time.Second*scale); code != 0 {
		t.Fatalf("supervisor exit status %d on SIGTERM:\n%s", code, tail(sup.out.String(), 20))
	}
	deadline = time.Now().Add(10 * time.Second * scale)
	for syscall.Kill(second, 0) == nil && !zombie(second) {
		if time.Now().After(deadline) {
			t.Fatal("the signer still runs after the supervisor stopped")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// zombie reports whether pid has exited and waits for its parent to reap it.
func zombie(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return true
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "State:") {
			return strings.Contains(l, "Z")
		}
	}
	return false
}
