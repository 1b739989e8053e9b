package cli

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nitrosign/nitrosign/enclave/enclavetest"
	"github.com/nitrosign/nitrosign/internal/callauth"
)

// benchJSON is the part of a bench result the tests read.
type benchJSON struct {
	Name              string  `json:"name"`
	Requests          int64   `json:"requests"`
	Successes         int64   `json:"successes"`
	RPS               float64 `json:"rps"`
	ConnectionsOpened int64   `json:"connections_opened"`
	Latency           struct {
		Count int64   `json:"count"`
		P50   float64 `json:"p50_us"`
		P99   float64 `json:"p99_us"`
		Max   float64 `json:"max_us"`
	} `json:"latency"`
	Uncorrected *struct {
		Count int64 `json:"count"`
	} `json:"latency_uncorrected"`
	Rounds []struct {
		RPS float64 `json:"rps"`
	} `json:"rounds"`
}

func readJSON(t *testing.T, file string, v any) {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatalf("%s: %v\n%s", file, err, b)
	}
}

func TestBenchAgainstEnclave(t *testing.T) {
	e := enclavetest.Start(t, enclavetest.DefaultConfig(), 0)
	tg := "--target=" + e.Target
	dir := t.TempDir()

	t.Run("echo closed loop", func(t *testing.T) {
		js, svg := filepath.Join(dir, "echo.json"), filepath.Join(dir, "echo.svg")
		r := mustOK(t, run(t, "", "bench", tg, "--requests", "300", "--concurrency", "4", "--connections", "2",
			"--warmup", "0s", "--payload-size", "100", "--json", js, "--chart", svg))
		for _, want := range []string{"echo, 100 B payload", "throughput:", "p99.9", "300 ok, 0 failed"} {
			if !strings.Contains(r.stdout, want) {
				t.Fatalf("summary lacks %q:\n%s", want, r.stdout)
			}
		}
		var res benchJSON
		readJSON(t, js, &res)
		if res.Requests != 300 || res.Successes != 300 || res.Latency.Count != 300 || res.RPS <= 0 ||
			res.Latency.P50 <= 0 || res.Latency.P99 < res.Latency.P50 || res.Uncorrected != nil {
			t.Fatalf("JSON result %+v", res)
		}
		if b, err := os.ReadFile(svg); err != nil || !strings.HasPrefix(string(b), "<svg") || !strings.Contains(string(b), "<polyline") {
			t.Fatalf("chart: %v %.100q", err, b)
		}
	})

	t.Run("sign every key", func(t *testing.T) {
		for _, args := range [][]string{
			{"--key-type", "ecc"},
			{"--key-type", "rsa", "--algorithm", "RSASSA_PSS_SHA_256", "--message-type", "digest", "--message-size", "1000"},
			{"--key-type", "ed25519", "--message-size", "4096"},
		} {
			r := mustOK(t, run(t, "", append([]string{"bench", tg, "--rpc", "sign", "--requests", "20", "--concurrency", "2", "--warmup", "0s", "--output", "json"}, args...)...))
			var res benchJSON
			if err := json.Unmarshal([]byte(r.stdout), &res); err != nil {
				t.Fatal(err)
			}
			if res.Successes != 20 {
				t.Fatalf("%v: %d successes, want 20:\n%s", args, res.Successes, r.stdout)
			}
		}
	})

	t.Run("open loop", func(t *testing.T) {
		js := filepath.Join(dir, "rate.json")
		r := mustOK(t, run(t, "", "bench", tg, "--rate", "500", "--requests", "100", "--concurrency", "8", "--warmup", "100ms", "--json", js))
		if !strings.Contains(r.stdout, "coordinated omission corrected") || !strings.Contains(r.stdout, "uncorrected") {
			t.Fatalf("open-loop summary:\n%s", r.stdout)
		}
		var res benchJSON
		readJSON(t, js, &res)
		if res.Requests != 100 || res.Uncorrected == nil || res.Uncorrected.Count != 100 {
			t.Fatalf("open-loop JSON %+v", res)
		}
	})

	t.Run("connection churn", func(t *testing.T) {
		r := mustOK(t, run(t, "", "bench", tg, "--connect-every", "5", "--requests", "60", "--concurrency", "3", "--warmup", "0s", "--output", "json"))
		var res benchJSON
		if err := json.Unmarshal([]byte(r.stdout), &res); err != nil {
			t.Fatal(err)
		}
		// 60 calls by 3 workers, each with a fresh connection every 5 calls:
		// between 12 and 14 connections (the split of calls over workers
		// may leave a partly used connection per worker).
		if res.Successes != 60 || res.ConnectionsOpened < 12 || res.ConnectionsOpened > 14 {
			t.Fatalf("churn: %d successes, %d connections opened", res.Successes, res.ConnectionsOpened)
		}
	})

	t.Run("compare", func(t *testing.T) {
		js, page := filepath.Join(dir, "cmp.json"), filepath.Join(dir, "cmp.html")
		r := mustOK(t, run(t, "", "compare", "--target", "a="+e.Target, "--target", "b="+e.Target, "--rounds", "2",
			"--requests", "50", "--concurrency", "2", "--warmup", "0s", "--pause", "0s", "--json", js, "--chart", page))
		for _, want := range []string{"2 rounds per target, interleaved", "b over a: throughput", "calls/s"} {
			if !strings.Contains(r.stdout, want) {
				t.Fatalf("compare output lacks %q:\n%s", want, r.stdout)
			}
		}
		var cmp struct {
			Results []benchJSON `json:"results"`
			Ratios  []struct {
				Throughput float64 `json:"throughput_ratio"`
			} `json:"ratios"`
		}
		readJSON(t, js, &cmp)
		if len(cmp.Results) != 2 || cmp.Results[1].Name != "b" || cmp.Results[0].Requests != 100 ||
			len(cmp.Results[0].Rounds) != 2 || len(cmp.Ratios) != 1 || cmp.Ratios[0].Throughput <= 0 {
			t.Fatalf("compare JSON %+v", cmp)
		}
		if b, err := os.ReadFile(page); err != nil || !strings.Contains(string(b), "<!DOCTYPE html>") || !strings.Contains(string(b), "<svg") {
			t.Fatalf("HTML chart: %v", err)
		}
	})
}

func TestBenchUsageErrors(t *testing.T) {
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"bench", "--rpc", "ping"}, `rpc "ping": want echo or sign`},
		{[]string{"bench", "--duration", "1s", "--requests", "5"}, "not both"},
		{[]string{"bench", "--concurrency", "0"}, "concurrency 0"},
		{[]string{"bench", "--connections", "4", "--concurrency", "2"}, "more than concurrency"},
		{[]string{"bench", "--connections", "2", "--concurrency", "4", "--connect-every", "3"}, "does not apply with --connect-every"},
		{[]string{"bench", "--rate", "-5"}, "rate -5"},
		{[]string{"bench", "--rpc", "sign", "--key-type", "dsa"}, "want rsa, ecc or ed25519"},
		{[]string{"bench", "--rpc", "sign", "--message-size", "5000"}, "at most 4096"},
		{[]string{"bench", "--chart", "out.png"}, "must end in .svg or .html"},
		{[]string{"bench", "--output", "yaml"}, "want text or json"},
		{[]string{"bench", "--target", "127.0.0.1:1"}, "want vsock://CID:PORT or tcp://HOST:PORT"},
		{[]string{"bench", "--watch-pid", "x"}, "not a process id"},
		{[]string{"bench", "extra"}, "unexpected argument"},
		{[]string{"compare", "--target", "a=tcp://127.0.0.1:1"}, "at least two --target"},
		{[]string{"compare", "--target", "a=tcp://127.0.0.1:1", "--target", "a=tcp://127.0.0.1:2"}, `two targets are named "a"`},
		{[]string{"compare", "--target", "a=http://x"}, "unknown scheme"},
		{[]string{"compare", "--target", "a=tcp://127.0.0.1:1", "--target", "b=tcp://127.0.0.1:2", "--rounds", "0"}, "--rounds 0"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			r := run(t, "", tt.args...)
			if r.code != ExitUsage {
				t.Fatalf("exit %d, want %d (usage); stderr %q", r.code, ExitUsage, r.stderr)
			}
			if !strings.Contains(r.stderr, tt.want) {
				t.Fatalf("stderr %q does not say %q", r.stderr, tt.want)
			}
		})
	}
	for _, cmd := range []string{"bench", "compare"} {
		if r := run(t, "", cmd, "-h"); r.code != ExitOK || !strings.Contains(r.stderr, "Examples:") || !strings.Contains(r.stderr, "--concurrency") {
			t.Fatalf("%s -h: exit %d, %q", cmd, r.code, r.stderr)
		}
	}
	if r := run(t, "", "--help"); !strings.Contains(r.stdout, "bench") || !strings.Contains(r.stdout, "compare") {
		t.Fatalf("top-level usage does not list bench and compare:\n%s", r.stdout)
	}
}

func TestBenchDeadTarget(t *testing.T) {
	r := run(t, "", "bench", "--target", "tcp://127.0.0.1:1", "--requests", "5", "--call-timeout", "2s")
	if r.code != ExitFailure || !strings.Contains(r.stderr, "cannot reach tcp://127.0.0.1:1") {
		t.Fatalf("dead target: exit %d, stderr %q", r.code, r.stderr)
	}
}

// compare --identity: the same enclave, unsigned and signed Sign calls, one
// beside the other. The enclave enforces a policy and refuses unsigned
// calls, so the unsigned target's calls all fail Unauthenticated and the
// signed ones all succeed.
func TestCompareWithIdentity(t *testing.T) {
	dir := t.TempDir()
	idFile := filepath.Join(dir, "alice.key")
	mustOK(t, run(t, "", "identity", "create", "--out", idFile))
	id, err := callauth.LoadIdentity(idFile)
	if err != nil {
		t.Fatal(err)
	}
	policy := filepath.Join(dir, "policy.json")
	pol, _ := json.Marshal(map[string]any{"version": 1, "callers": []any{map[string]any{"name": "alice", "public_key": string(id.PublicKeyPEM()), "sign": []any{map[string]any{}}}}})
	if err := os.WriteFile(policy, pol, 0o600); err != nil {
		t.Fatal(err)
	}
	c := enclavetest.DefaultConfig()
	c.Authz.DevAllowAnonymous = false
	c.Authz.PolicyFile = policy
	e := enclavetest.Start(t, c, 0)
	js := filepath.Join(dir, "cmp.json")
	run(t, "", "compare", "--rpc", "sign", "--key-type", "ecc", "--target", "anonymous="+e.Target, "--target", "signed="+e.Target,
		"--identity", "signed="+idFile, "--rounds", "1", "--requests", "20", "--concurrency", "1", "--warmup", "0s", "--pause", "0s", "--json", js)
	var cmp struct {
		Results []benchJSON `json:"results"`
	}
	readJSON(t, js, &cmp)
	if len(cmp.Results) != 2 || cmp.Results[0].Successes != 0 || cmp.Results[1].Successes != 20 {
		t.Fatalf("compare with --identity: %+v", cmp.Results)
	}
	if r := run(t, "", "compare", "--target", "a="+e.Target, "--target", "b="+e.Target, "--identity", "c="+idFile); r.code != ExitUsage || !strings.Contains(r.stderr, `no target is named "c"`) {
		t.Fatalf("an identity for no target: exit %d, %s", r.code, r.stderr)
	}
	if r := run(t, "", "bench", "--target", e.Target, "--rpc", "sign", "--identity", filepath.Join(dir, "missing.key"), "--requests", "1"); r.code == ExitOK {
		t.Fatal("bench with a missing identity file succeeded")
	}
}
