package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func runArgs(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var out, errb bytes.Buffer
	code := run(ctx, args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestUsage(t *testing.T) {
	tests := []struct {
		args []string
		code int
		want string
	}{
		{nil, 2, "sign-baseline"},
		{[]string{"-h"}, 0, "enclave"},
		{[]string{"frobnicate"}, 2, `unknown command "frobnicate"`},
		{[]string{"enclave", "-h"}, 0, "Examples:"},
		{[]string{"enclave", "--listen", "0.0.0.0:7001"}, 2, "loopback only"},
		{[]string{"enclave", "--listen", "127.0.0.1:7001", "--pprof-listen", "0.0.0.0:6060"}, 2, "only be served on loopback"},
		{[]string{"enclave", "--rsa-bits", "1024"}, 2, "RSA key size 1024"},
		{[]string{"enclave", "extra"}, 2, "unexpected argument"},
		{[]string{"proxy", "--listen", "10.0.0.1:7002"}, 2, "loopback only"},
		{[]string{"proxy", "--upstream", "http://x"}, 2, "unknown scheme"},
		{[]string{"sign-baseline", "-h"}, 0, "in-process"},
		{[]string{"sign-baseline", "--key-type", "dsa"}, 2, "key type"},
		{[]string{"sign-baseline", "--target", "nameless"}, 2, "NAME=ADDRESS"},
		{[]string{"sign-baseline", "--chart", "x.png"}, 2, ".svg"},
		{[]string{"sign-baseline", "--key-type", "ecc", "--algorithm", "RSASSA_PSS_SHA_256"}, 2, "does not fit"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			code, _, stderr := runArgs(t, tt.args...)
			if code != tt.code || !strings.Contains(stderr, tt.want) {
				t.Fatalf("exit %d, stderr %q; want exit %d saying %q", code, stderr, tt.code, tt.want)
			}
		})
	}
}

func TestSignBaselineInProcess(t *testing.T) {
	dir := t.TempDir()
	js, svg := filepath.Join(dir, "b.json"), filepath.Join(dir, "b.svg")
	code, stdout, stderr := runArgs(t, "sign-baseline", "--key-type", "ed25519", "--concurrency", "2",
		"--duration", "200ms", "--warmup", "0s", "--rounds", "2", "--json", js, "--chart", svg)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	if !strings.Contains(stdout, "in-process") || !strings.Contains(stdout, "2 rounds per target") {
		t.Fatalf("output:\n%s", stdout)
	}
	b, err := os.ReadFile(js)
	if err != nil {
		t.Fatal(err)
	}
	var cmp struct {
		Results []struct {
			Name      string `json:"name"`
			Successes int64  `json:"successes"`
			Requests  int64  `json:"requests"`
		} `json:"results"`
	}
	if err := json.Unmarshal(b, &cmp); err != nil {
		t.Fatal(err)
	}
	if len(cmp.Results) != 1 || cmp.Results[0].Name != "in-process" || cmp.Results[0].Successes == 0 ||
		cmp.Results[0].Successes != cmp.Results[0].Requests {
		t.Fatalf("results %+v", cmp.Results)
	}
	if b, err := os.ReadFile(svg); err != nil || !bytes.HasPrefix(b, []byte("<svg")) {
		t.Fatalf("chart: %v", err)
	}
}

func TestTCPPingPong(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan int)
	go func() { done <- run(ctx, []string{"tcp-echo", "--listen", addr}, io.Discard, io.Discard) }()
	var out bytes.Buffer
	var code int
	for range 50 { // until the echo listens
		out.Reset()
		if code = run(context.Background(), []string{"tcp-pingpong", "--target", addr, "--count", "200"}, &out, io.Discard); code == 0 {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	cancel()
	if echoCode := <-done; echoCode != 0 {
		t.Fatalf("tcp-echo exited %d", echoCode)
	}
	if code != 0 || !strings.Contains(out.String(), "200 round trips") || !strings.Contains(out.String(), "p50") {
		t.Fatalf("tcp-pingpong exit %d: %q", code, out.String())
	}
	if code := run(context.Background(), []string{"tcp-echo", "--listen", "0.0.0.0:1"}, io.Discard, io.Discard); code != 2 {
		t.Fatalf("tcp-echo beyond loopback: exit %d, want 2", code)
	}
}
