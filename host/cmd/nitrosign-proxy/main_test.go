package main

import (
	"bytes"
	"errors"
	"flag"
	"os"
	"path/filepath"
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

		// Services for enclaves on vsock.
		{name: "enclave services off by default", args: nil, check: func(t *testing.T, c proxy.Config) {
			if c.EnclaveLogPort != 0 || c.EnclaveHostPort != 0 || c.KMSForwardPort != 0 || c.KMSRegion != "" || c.KMSEndpoint != "" ||
				c.KeysetFile != "/var/lib/nitrosign/keyset.sealed" {
				t.Fatalf("defaults: %+v", c)
			}
		}},
		{name: "host service and KMS forwarder", args: []string{"--enclave-log-port", "5050", "--enclave-host-port", "5051",
			"--keyset-file", "/srv/nitrosign/ks", "--kms-forward-port", "8000", "--kms-region", "eu-west-1"}, check: func(t *testing.T, c proxy.Config) {
			if c.EnclaveLogPort != 5050 || c.EnclaveHostPort != 5051 || c.KeysetFile != "/srv/nitrosign/ks" || c.KMSForwardPort != 8000 || c.KMSRegion != "eu-west-1" {
				t.Fatalf("flags not applied: %+v", c)
			}
			if d, err := c.KMSDestination(); err != nil || d != "kms.eu-west-1.amazonaws.com:443" {
				t.Fatalf("KMSDestination = %q, %v", d, err)
			}
		}},
		{name: "KMS endpoint overrides the region", args: []string{"--kms-forward-port", "8000", "--kms-region", "eu-west-1", "--kms-endpoint", "kms-fips.eu-west-1.amazonaws.com:443"}, check: func(t *testing.T, c proxy.Config) {
			if d, err := c.KMSDestination(); err != nil || d != "kms-fips.eu-west-1.amazonaws.com:443" {
				t.Fatalf("KMSDestination = %q, %v", d, err)
			}
		}},
		{name: "KMS endpoint alone", args: []string{"--kms-forward-port", "8000", "--kms-endpoint", "127.0.0.1:4443"}, check: func(t *testing.T, c proxy.Config) {
			if d, err := c.KMSDestination(); err != nil || d != "127.0.0.1:4443" {
				t.Fatalf("KMSDestination = %q, %v", d, err)
			}
		}},
		{name: "China region", args: []string{"--kms-forward-port", "8000", "--kms-region", "cn-north-1"}, check: func(t *testing.T, c proxy.Config) {
			if d, err := c.KMSDestination(); err != nil || d != "kms.cn-north-1.amazonaws.com.cn:443" {
				t.Fatalf("KMSDestination = %q, %v", d, err)
			}
		}},
		{name: "GovCloud region", args: []string{"--kms-forward-port", "8000", "--kms-region", "us-gov-west-1"}, check: func(t *testing.T, c proxy.Config) {
			if d, err := c.KMSDestination(); err != nil || d != "kms.us-gov-west-1.amazonaws.com:443" {
				t.Fatalf("KMSDestination = %q, %v", d, err)
			}
		}},
		{name: "host port is the heartbeat", args: []string{"--enclave-host-port", "9000"}, wantErr: "enclave host port 9000 is nitro-cli's boot heartbeat"},
		{name: "KMS port is the heartbeat", args: []string{"--kms-forward-port", "9000", "--kms-region", "eu-west-1"}, wantErr: "KMS forward port 9000 is nitro-cli's boot heartbeat"},
		{name: "host port is the log port", args: []string{"--enclave-log-port", "5050", "--enclave-host-port", "5050"}, wantErr: "--enclave-log-port and --enclave-host-port are both vsock port 5050"},
		{name: "KMS port is the host port", args: []string{"--enclave-host-port", "5051", "--kms-forward-port", "5051", "--kms-region", "eu-west-1"}, wantErr: "--enclave-host-port and --kms-forward-port are both vsock port 5051"},
		{name: "KMS port is the log port", args: []string{"--enclave-log-port", "8000", "--kms-forward-port", "8000", "--kms-region", "eu-west-1"}, wantErr: "--enclave-log-port and --kms-forward-port are both vsock port 8000"},
		{name: "host port not a number", args: []string{"--enclave-host-port", "x"}, wantErr: "want a vsock port number"},
		{name: "KMS port too big", args: []string{"--kms-forward-port", "4294967296"}, wantErr: "want a vsock port number"},
		{name: "relative keyset file", args: []string{"--enclave-host-port", "5051", "--keyset-file", "keyset.sealed"}, wantErr: `--keyset-file: keyset file "keyset.sealed": want an absolute path`},
		{name: "keyset file a directory", args: []string{"--enclave-host-port", "5051", "--keyset-file", "/var/lib/nitrosign/"}, wantErr: "want a clean path to a file"},
		{name: "keyset file unchecked while off", args: []string{"--keyset-file", "relative"}, check: func(*testing.T, proxy.Config) {}},
		{name: "KMS forwarder without destination", args: []string{"--kms-forward-port", "8000"}, wantErr: "KMS forward port 8000 has no destination: give --kms-region"},
		{name: "KMS region empty, as from an unset environment file", args: []string{"--kms-forward-port", "8000", "--kms-region", ""}, wantErr: "has no destination", wantStderr: "set NITROSIGN_KMS_REGION in /etc/nitrosign/proxy.env"},
		{name: "KMS region malformed", args: []string{"--kms-forward-port", "8000", "--kms-region", "EU-WEST-1"}, wantErr: `KMS region "EU-WEST-1": want an AWS region name such as eu-west-1`},
		{name: "KMS region a URL", args: []string{"--kms-forward-port", "8000", "--kms-region", "kms.eu-west-1.amazonaws.com"}, wantErr: "want an AWS region name"},
		{name: "KMS endpoint without port", args: []string{"--kms-forward-port", "8000", "--kms-endpoint", "kms.eu-west-1.amazonaws.com"}, wantErr: "--kms-endpoint: KMS endpoint \"kms.eu-west-1.amazonaws.com\": want HOST:PORT"},
		{name: "KMS endpoint port 0", args: []string{"--kms-forward-port", "8000", "--kms-endpoint", "localhost:0"}, wantErr: "port must be 1-65535"},
		{name: "KMS region without the forwarder", args: []string{"--kms-region", "eu-west-1"}, wantErr: "it is off: give --kms-forward-port too"},
		{name: "KMS endpoint without the forwarder", args: []string{"--kms-endpoint", "localhost:443"}, wantErr: "it is off: give --kms-forward-port too"},
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
// systemd unit or drop-in, continuation lines joined, each ${NAME} replaced
// by env's value as systemd does (one argument, empty when unset).
func execStart(t *testing.T, path string, env map[string]string) []string {
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
	for i, a := range args {
		if name, ok := strings.CutPrefix(a, "${"); ok && strings.HasSuffix(name, "}") {
			args[i] = env[strings.TrimSuffix(name, "}")]
		}
	}
	return args[1:]
}

// proxyEnv is deploy/proxy.env, the unit's EnvironmentFile, as systemd
// reads it.
func proxyEnv(t *testing.T) map[string]string {
	t.Helper()
	b, err := os.ReadFile("../../../deploy/proxy.env")
	if err != nil {
		t.Fatal(err)
	}
	env := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		if line = strings.TrimSpace(line); line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			t.Fatalf("deploy/proxy.env: %q is not NAME=value", line)
		}
		env[k] = v
	}
	return env
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
	shipped := proxyEnv(t)
	if _, ok := shipped["NITROSIGN_KMS_REGION"]; !ok {
		t.Fatal("deploy/proxy.env does not name NITROSIGN_KMS_REGION")
	}
	// What an operator sets in /etc/nitrosign/proxy.env.
	env := map[string]string{"NITROSIGN_KMS_REGION": "eu-west-1"}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			var stderr bytes.Buffer
			c, err := parseFlags(execStart(t, tt.file, env), &stderr)
			if err != nil {
				t.Fatalf("ExecStart flags: %v\n%s", err, stderr.String())
			}
			if c.Metrics.Listen != "127.0.0.1:9464" {
				t.Errorf("metrics on %q, want 127.0.0.1:9464", c.Metrics.Listen)
			}
			// The enclave's defaults (enclave/keyset: vsock://3:5051 and
			// vsock://3:8000; enclave/logship: 5050).
			if c.EnclaveLogPort != 5050 || c.EnclaveHostPort != 5051 || c.KMSForwardPort != 8000 ||
				c.KeysetFile != "/var/lib/nitrosign/keyset.sealed" || c.KMSRegion != "eu-west-1" || c.KMSEndpoint != "" {
				t.Errorf("enclave services: log %d, host %d, kms %d, keyset %q, region %q, endpoint %q",
					c.EnclaveLogPort, c.EnclaveHostPort, c.KMSForwardPort, c.KeysetFile, c.KMSRegion, c.KMSEndpoint)
			}
			// As shipped, the region is empty: refused, saying where to
			// set it.
			stderr.Reset()
			if _, err := parseFlags(execStart(t, tt.file, shipped), &stderr); shipped["NITROSIGN_KMS_REGION"] == "" &&
				(err == nil || !strings.Contains(stderr.String(), "set NITROSIGN_KMS_REGION in /etc/nitrosign/proxy.env")) {
				t.Errorf("with the shipped proxy.env: %v, stderr %q; want the region asked for", err, stderr.String())
			}
			if want := "vsock://" + enclaveCID(t) + ":5005"; strings.Join(c.Upstreams, ",") != want {
				t.Errorf("upstreams %q, want %q: keep it in step with ENCLAVE_CID in deploy/enclave.env", c.Upstreams, want)
			}
			tt.check(t, c)
		})
	}
}

// The keyset file is in the unit's state directory, which only the
// service may read.
func TestDeployUnitStateDirectory(t *testing.T) {
	b, err := os.ReadFile("../../../deploy/nitrosign-proxy.service")
	if err != nil {
		t.Fatal(err)
	}
	unit := string(b)
	for _, want := range []string{"\nStateDirectory=nitrosign\n", "\nStateDirectoryMode=0700\n", "\nEnvironmentFile=-/etc/nitrosign/proxy.env\n"} {
		if !strings.Contains(unit, want) {
			t.Errorf("the unit has no %q", strings.TrimSpace(want))
		}
	}
	c, err := parseFlags(execStart(t, "../../../deploy/nitrosign-proxy.service", map[string]string{"NITROSIGN_KMS_REGION": "eu-west-1"}), &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Dir(c.KeysetFile) != "/var/lib/nitrosign" {
		t.Errorf("--keyset-file %s is not in /var/lib/nitrosign, the StateDirectory", c.KeysetFile)
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
