package main

import (
	"bytes"
	"errors"
	"flag"
	"os"
	"strings"
	"testing"
	"time"

	"go.uber.org/fx"
	"go.uber.org/goleak"

	"github.com/nitrosign/nitrosign/host/proxy"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func TestParseFlags(t *testing.T) {
	tests := []struct {
		name       string
		args       []string
		check      func(t *testing.T, c proxy.Config)
		wantErr    string // in the returned error and in stderr
		wantHelp   bool
		wantStderr string
	}{
		{name: "defaults", args: nil, check: func(t *testing.T, c proxy.Config) {
			if c.Listen != "127.0.0.1:8443" || strings.Join(c.Upstreams, ",") != "vsock://16:5005" || c.Pool.Size != 4 ||
				c.GracefulStopTimeout != 10*time.Second || c.Log.Level != "info" || c.Log.Format != "json" {
				t.Fatalf("defaults: %+v", c)
			}
		}},
		{name: "every flag", args: []string{
			"--listen", "127.0.0.1:9443", "--upstream", "vsock://42:6000", "--pool-size", "8",
			"--graceful-timeout", "3s", "--log-level", "debug", "--log-format", "console",
		}, check: func(t *testing.T, c proxy.Config) {
			if c.Listen != "127.0.0.1:9443" || strings.Join(c.Upstreams, ",") != "vsock://42:6000" || c.Pool.Size != 8 ||
				c.GracefulStopTimeout != 3*time.Second || c.Log.Level != "debug" || c.Log.Format != "console" {
				t.Fatalf("flags not applied: %+v", c)
			}
		}},
		{name: "tcp upstream", args: []string{"-upstream=tcp://127.0.0.1:5005"}, check: func(t *testing.T, c proxy.Config) {
			if strings.Join(c.Upstreams, ",") != "tcp://127.0.0.1:5005" {
				t.Fatalf("upstreams %q", c.Upstreams)
			}
		}},
		{name: "tls, mtls and metrics flags", args: []string{
			"--listen", "0.0.0.0:8443", "--tls-cert", "/etc/s.pem", "--tls-key", "/etc/k.pem", "--client-ca", "/etc/ca.pem",
			"--metrics-listen", "127.0.0.1:9464",
		}, check: func(t *testing.T, c proxy.Config) {
			if c.TLS.CertFile != "/etc/s.pem" || c.TLS.KeyFile != "/etc/k.pem" || c.TLS.ClientCAFile != "/etc/ca.pem" ||
				c.Metrics.Listen != "127.0.0.1:9464" || c.Insecure {
				t.Fatalf("flags not applied: %+v", c)
			}
		}},
		{name: "plaintext beyond loopback with --insecure", args: []string{"--listen", "0.0.0.0:8443", "--insecure"}, check: func(t *testing.T, c proxy.Config) {
			if !c.Insecure || c.Listen != "0.0.0.0:8443" {
				t.Fatalf("flags not applied: %+v", c)
			}
		}},
		{name: "plaintext beyond loopback refused", args: []string{"--listen", "0.0.0.0:8443"}, wantErr: "is not loopback and the port has no TLS"},
		{name: "plaintext on all interfaces refused", args: []string{"--listen", ":8443"}, wantErr: "--insecure to serve plaintext anyway"},
		{name: "cert without key", args: []string{"--tls-cert", "/etc/s.pem"}, wantErr: "add --tls-key"},
		{name: "client CA without cert", args: []string{"--client-ca", "/etc/ca.pem"}, wantErr: "needs a server certificate"},
		{name: "insecure and tls", args: []string{"--insecure", "--tls-cert", "a", "--tls-key", "b"}, wantErr: "contradicts --tls-cert"},
		{name: "bad metrics listen", args: []string{"--metrics-listen", "9464"}, wantErr: `metrics listen address "9464"`},
		{name: "pool size zero", args: []string{"--pool-size", "0"}, wantErr: "pool size 0: must be between 1 and 256"},
		{name: "two upstreams", args: []string{"--upstream", "vsock://16:5005", "--upstream", "vsock://17:5005"}, check: func(t *testing.T, c proxy.Config) {
			if strings.Join(c.Upstreams, ",") != "vsock://16:5005,vsock://17:5005" {
				t.Fatalf("upstreams %q", c.Upstreams)
			}
		}},
		{name: "bad upstream", args: []string{"--upstream", "16:5005"}, wantErr: "want vsock://CID:PORT or tcp://HOST:PORT"},
		{name: "heartbeat port", args: []string{"--upstream", "vsock://16:9000"}, wantErr: "reserved for the nitro-cli boot heartbeat"},
		{name: "bad listen", args: []string{"--listen", "8443"}, wantErr: `listen address "8443"`},
		{name: "bad timeout", args: []string{"--graceful-timeout", "0s"}, wantErr: "graceful stop timeout 0s"},
		{name: "bad log level", args: []string{"--log-level", "verbose"}, wantErr: `log level "verbose"`},
		{name: "two errors, both reported", args: []string{"--pool-size", "0", "--log-format", "xml"}, wantErr: "pool size 0", wantStderr: `log format "xml"`},
		{name: "unknown flag", args: []string{"--port", "1"}, wantErr: "flag provided but not defined: -port"},
		{name: "not a number", args: []string{"--pool-size", "four"}, wantErr: "invalid value"},
		{name: "stray argument", args: []string{"vsock://16:5005"}, wantErr: `unexpected argument "vsock://16:5005"`},
		{name: "help", args: []string{"-h"}, wantHelp: true, wantStderr: "Examples:"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stderr bytes.Buffer
			cfg, err := parseFlags(tt.args, &stderr)
			switch {
			case tt.wantHelp:
				if !errors.Is(err, flag.ErrHelp) {
					t.Fatalf("err = %v, want flag.ErrHelp", err)
				}
			case tt.wantErr != "":
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want it to contain %q", err, tt.wantErr)
				}
				if !strings.Contains(stderr.String(), tt.wantErr) {
					t.Fatalf("stderr %q does not explain %q", stderr.String(), tt.wantErr)
				}
			default:
				if err != nil {
					t.Fatalf("parseFlags: %v (stderr %q)", err, stderr.String())
				}
				tt.check(t, cfg)
			}
			if tt.wantStderr != "" && !strings.Contains(stderr.String(), tt.wantStderr) {
				t.Fatalf("stderr %q, want it to contain %q", stderr.String(), tt.wantStderr)
			}
		})
	}
}

// The graph main runs, for the config main builds, is complete.
func TestValidateApp(t *testing.T) {
	cfg, err := parseFlags(nil, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if err := fx.ValidateApp(proxy.Options(cfg)); err != nil {
		t.Fatalf("fx.ValidateApp: %v", err)
	}
}

// execStart returns the arguments of the last non-empty ExecStart= of a
// systemd unit or drop-in, continuation lines joined.
func execStart(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	text := strings.ReplaceAll(string(b), "\\\n", " ")
	var args []string
	for _, line := range strings.Split(text, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "ExecStart="); ok && strings.TrimSpace(v) != "" {
			args = strings.Fields(v)
		}
	}
	if len(args) == 0 || args[0] != "/usr/local/bin/nitrosign-proxy" {
		t.Fatalf("%s: ExecStart runs %q, want /usr/local/bin/nitrosign-proxy", path, args)
	}
	return args[1:]
}

// The flags of the shipped unit and of its TLS drop-in parse, and keep to
// the rules: plaintext and metrics on loopback only, TLS off the loopback.
func TestDeployUnitFlags(t *testing.T) {
	tests := []struct {
		file  string
		check func(t *testing.T, c proxy.Config)
	}{
		{"../../../deploy/nitrosign-proxy.service", func(t *testing.T, c proxy.Config) {
			if c.Listen != "127.0.0.1:8443" || c.TLS.Enabled() || c.Insecure {
				t.Errorf("unit serves %s (TLS %v, insecure %v), want plaintext on loopback", c.Listen, c.TLS.Enabled(), c.Insecure)
			}
		}},
		{"../../../deploy/nitrosign-proxy.service.d/tls.conf.example", func(t *testing.T, c proxy.Config) {
			if !c.TLS.Enabled() || !c.TLS.MutualTLS() || c.Insecure {
				t.Errorf("TLS drop-in: %+v, want mutual TLS", c.TLS)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			var stderr bytes.Buffer
			c, err := parseFlags(execStart(t, tt.file), &stderr)
			if err != nil {
				t.Fatalf("ExecStart flags: %v\n%s", err, stderr.String())
			}
			if c.Metrics.Listen != "127.0.0.1:9464" {
				t.Errorf("metrics on %q, want 127.0.0.1:9464", c.Metrics.Listen)
			}
			if want := "vsock://" + enclaveCID(t) + ":5005"; strings.Join(c.Upstreams, ",") != want {
				t.Errorf("upstreams %q, want %q: keep it in step with ENCLAVE_CID in deploy/enclave.env", c.Upstreams, want)
			}
			tt.check(t, c)
		})
	}
}

// enclaveCID is ENCLAVE_CID of deploy/enclave.env.
func enclaveCID(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("../../../deploy/enclave.env")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "ENCLAVE_CID="); ok {
			return strings.TrimSpace(v)
		}
	}
	t.Fatal("deploy/enclave.env has no ENCLAVE_CID=")
	return ""
}
