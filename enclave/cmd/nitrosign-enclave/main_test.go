package main

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/nitrosign/nitrosign/enclave/authz"
	"github.com/nitrosign/nitrosign/enclave/listener"
	"github.com/nitrosign/nitrosign/internal/target"
)

func TestParseFlags(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		wantErr string // "" = valid
	}{
		{"defaults", nil, ""},
		{"loopback development", []string{"--cid", "1", "--port", "5005", "--dev-simulated-nsm", "--log-format", "console"}, ""},
		{"heartbeat port", []string{"--port", "9000"}, "9000"},
		{"bad cid", []string{"--cid", "host"}, `want "any" or a number`},
		{"bad rsa", []string{"--rsa-bits", "1024"}, "RSA key size 1024"},
		{"bad log format", []string{"--log-format", "xml"}, `log format "xml"`},
		{"stray argument", []string{"serve"}, `unexpected argument "serve"`},
		{"port too big", []string{"--port", "4294967296"}, "does not fit 32 bits"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stderr bytes.Buffer
			_, err := parseFlags(tt.args, &stderr)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("parseFlags: %v (%s)", err, stderr.String())
				}
				return
			}
			if err == nil || !strings.Contains(stderr.String()+err.Error(), tt.wantErr) {
				t.Fatalf("err %v, stderr %q; want %q", err, stderr.String(), tt.wantErr)
			}
		})
	}
	if _, err := parseFlags([]string{"-h"}, &bytes.Buffer{}); !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("-h: %v", err)
	}
}

// --dev-key-seed: 64 hex characters, only with --dev-simulated-nsm; a
// refused value is never printed back (the flag package would quote it).
func TestDevKeySeedFlag(t *testing.T) {
	const seed = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
	var stderr bytes.Buffer
	c, err := parseFlags([]string{"--dev-simulated-nsm", "--dev-key-seed", seed}, &stderr)
	if err != nil {
		t.Fatalf("%v (%s)", err, stderr.String())
	}
	if got := hex.EncodeToString(c.Signer.DevKeySeed); got != seed {
		t.Fatalf("seed %s, want %s", got, seed)
	}
	if c, err := parseFlags([]string{"--dev-simulated-nsm"}, &stderr); err != nil || c.Signer.DevKeySeed != nil {
		t.Fatalf("no --dev-key-seed: seed %d bytes, %v", len(c.Signer.DevKeySeed), err)
	}
	for _, tt := range []struct {
		name, value string
		extra       []string
		want        string
	}{
		{"without the simulated NSM", seed, nil, "needs --dev-simulated-nsm"},
		{"short", seed[:62], []string{"--dev-simulated-nsm"}, "want 64 hex characters (32 bytes), got 62"},
		{"long", seed + "00", []string{"--dev-simulated-nsm"}, "got 66"},
		{"not hex", "zz" + seed[2:], []string{"--dev-simulated-nsm"}, "want 64 hex characters"},
		{"empty", "", []string{"--dev-simulated-nsm"}, "got 0"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var stderr bytes.Buffer
			_, err := parseFlags(append(tt.extra, "--dev-key-seed", tt.value), &stderr)
			if err == nil || !strings.Contains(stderr.String(), tt.want) {
				t.Fatalf("err %v, stderr %q; want %q", err, stderr.String(), tt.want)
			}
			for _, part := range []string{seed[2:18], seed[40:56]} {
				if strings.Contains(stderr.String()+err.Error(), part) {
					t.Fatalf("the refusal prints the seed: %q", stderr.String())
				}
			}
		})
	}
}

// dockerfile reads Dockerfile.enclave from the repository root.
func dockerfile(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("../../../Dockerfile.enclave")
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// The enclave's flags live in the image's ENTRYPOINT (nitro-cli passes
// none) and are measured: they must parse, serve on every CID at the
// default port, and never enable the simulated NSM.
func TestDockerfileEntrypoint(t *testing.T) {
	m := regexp.MustCompile(`(?m)^ENTRYPOINT (\[.*\])\s*$`).FindStringSubmatch(dockerfile(t))
	if m == nil {
		t.Fatal("Dockerfile.enclave has no exec-form ENTRYPOINT [...]")
	}
	var argv []string
	if err := json.Unmarshal([]byte(m[1]), &argv); err != nil {
		t.Fatalf("ENTRYPOINT is not a JSON array: %v", err)
	}
	if len(argv) == 0 || argv[0] != "/nitrosign-enclave" {
		t.Fatalf("ENTRYPOINT runs %q, want /nitrosign-enclave", argv)
	}
	// The KMS key comes from the image's environment, set from the
	// KMS_KEY_ARN build argument (measured like the flags).
	if !strings.Contains(dockerfile(t), "\nARG KMS_KEY_ARN\nENV "+kmsKeyARNEnv+"=${KMS_KEY_ARN}\n") {
		t.Fatalf("Dockerfile.enclave does not set %s from the KMS_KEY_ARN build argument", kmsKeyARNEnv)
	}
	t.Setenv(kmsKeyARNEnv, "arn:aws:kms:eu-west-1:111122223333:key/0b5c5a3e-1f2d-4c6b-9a8e-7d6f5e4d3c2b")
	var stderr bytes.Buffer
	c, err := parseFlags(argv[1:], &stderr)
	if err != nil {
		t.Fatalf("ENTRYPOINT flags do not parse: %v (%s)", err, stderr.String())
	}
	if !c.Signer.IsSealed() || c.Keyset.KMSKeyARN == "" {
		t.Fatal("ENTRYPOINT does not select sealed keys: every restart of a production enclave would make new keys")
	}
	if c.Authz.DevAllowAnonymous {
		t.Fatal("ENTRYPOINT lets anonymous callers sign")
	}
	if want := "vsock://3:5052"; c.AuditShip != want {
		t.Fatalf("ENTRYPOINT ships its audit trail to %q, want the parent, %s", c.AuditShip, want)
	}
	if c.Authz.PolicyFile != "/etc/nitrosign/policy.json" || !strings.Contains(dockerfile(t), "\nCOPY deploy/policy.json /etc/nitrosign/policy.json\n") {
		t.Fatalf("ENTRYPOINT's policy %q is not deploy/policy.json baked into the image", c.Authz.PolicyFile)
	}
	if _, err := authz.Load("../../../deploy/policy.json"); err != nil {
		t.Fatalf("deploy/policy.json: %v", err)
	}
	if c.Attest.DevSimulatedNSM {
		t.Fatal("ENTRYPOINT enables the simulated NSM: documents would not be genuine")
	}
	if c.Signer.DevKeySeed != nil {
		t.Fatal("ENTRYPOINT derives the keys from a development seed: anyone who knows it has the keys")
	}
	if c.Listener.CID != listener.CIDAny || c.Listener.Port != listener.DefaultPort {
		t.Fatalf("ENTRYPOINT listens on %d:%d, want any:%d", c.Listener.CID, c.Listener.Port, listener.DefaultPort)
	}
	if want := fmt.Sprintf("vsock://3:%d", target.LogPort); c.LogShip != want {
		t.Fatalf("ENTRYPOINT ships its logs to %q, want the parent, %s: a production enclave's console is unreadable", c.LogShip, want)
	}
}

// Every base image is pinned by digest, the builder's Go release is the
// one scripts/build-enclave-binary.sh expects, and the binary is built by
// that script (the same build the reproducibility check runs).
func TestDockerfilePinned(t *testing.T) {
	df := dockerfile(t)
	goImage := regexp.MustCompile(`(?m)^ARG GO_IMAGE=golang:(\d+\.\d+\.\d+)-bookworm@sha256:([0-9a-f]{64})$`).FindStringSubmatch(df)
	if goImage == nil {
		t.Fatal("ARG GO_IMAGE is not golang:X.Y.Z-bookworm@sha256:<64 hex>")
	}
	for _, line := range regexp.MustCompile(`(?m)^FROM .*$`).FindAllString(df, -1) {
		if !strings.Contains(line, "${GO_IMAGE}") && line != "FROM scratch" {
			t.Errorf("%q: base image not pinned by digest", line)
		}
	}
	if !strings.Contains(df, "RUN scripts/build-enclave-binary.sh /out/nitrosign-enclave") {
		t.Error("the image does not build with scripts/build-enclave-binary.sh")
	}
	script, err := os.ReadFile("../../../scripts/build-enclave-binary.sh")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(script), "readonly EXPECTED_GO=go"+goImage[1]+"\n") {
		t.Errorf("scripts/build-enclave-binary.sh does not expect go%s, the Dockerfile's Go", goImage[1])
	}
	for _, flag := range []string{"-trimpath", "-buildvcs=false", "-buildid=", "CGO_ENABLED=0"} {
		if !strings.Contains(string(script), flag) {
			t.Errorf("scripts/build-enclave-binary.sh lacks %s", flag)
		}
	}
}
