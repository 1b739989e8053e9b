package main

import (
	"bytes"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// The shipped enclave.env parses, and flags given on the command line win
// over it.
func TestConfigFile(t *testing.T) {
	_, file, _, _ := runtime.Caller(0)
	env := filepath.Join(filepath.Dir(file), "..", "..", "..", "deploy", "enclave.env")
	var stderr bytes.Buffer
	c, _, err := parseFlags([]string{"--config", env}, &stderr)
	if err != nil {
		t.Fatalf("deploy/enclave.env: %v\n%s", err, stderr.String())
	}
	if c.Name != "nitrosign" || c.EIF != "/opt/nitrosign/nitrosign-enclave.eif" || c.CID != 16 || c.CPUCount != 2 || c.MemoryMiB != 512 || c.Debug {
		t.Fatalf("deploy/enclave.env read as %+v", c)
	}
	c, _, err = parseFlags([]string{"--cid", "17", "--config", env, "--memory", "1024"}, &stderr)
	if err != nil {
		t.Fatal(err)
	}
	if c.CID != 17 || c.MemoryMiB != 1024 || c.CPUCount != 2 {
		t.Fatalf("flags did not override the file: %+v", c)
	}
}

func TestBadCommandLines(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	for _, tt := range []struct {
		args []string
		want string
	}{
		{nil, "EIF: none given"},
		{[]string{"--eif", "x.eif", "--cid", "2"}, "CID 2"},
		{[]string{"--config", filepath.Join(dir, "missing.env")}, "no such file"},
		{[]string{"--config", write("typo.env", "ENCLAVE_CIDS=16\n")}, `unknown setting "ENCLAVE_CIDS"`},
		{[]string{"--config", write("nan.env", "ENCLAVE_MEMORY_MIB=lots\n")}, `ENCLAVE_MEMORY_MIB="lots" is not a number`},
		{[]string{"--config", write("debug.env", "ENCLAVE_DEBUG=maybe\n")}, "want true or false"},
		{[]string{"--eif", "x.eif", "extra"}, `unexpected argument "extra"`},
	} {
		var stderr bytes.Buffer
		if code := run(tt.args, &stderr); code != 2 || !strings.Contains(stderr.String(), tt.want) {
			t.Errorf("%v: exit %d, stderr %q; want 2 and %q", tt.args, code, stderr.String(), tt.want)
		}
	}
}

// Without nitro-cli the supervisor says so and exits 1.
func TestNoNitroCLI(t *testing.T) {
	var stderr bytes.Buffer
	code := run([]string{"--eif", "x.eif", "--nitro-cli", filepath.Join(t.TempDir(), "nitro-cli")}, &stderr)
	if code != 1 || !strings.Contains(stderr.String(), "the enclave could not be started") || !strings.Contains(stderr.String(), "nitro-cli") {
		t.Fatalf("exit %d, stderr %q", code, stderr.String())
	}
}
