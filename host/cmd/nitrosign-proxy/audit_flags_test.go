package main

import (
	"bufio"
	"bytes"
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/fx"

	"github.com/nitrosign/nitrosign/host/auditlog"
	"github.com/nitrosign/nitrosign/host/proxy"
	"github.com/nitrosign/nitrosign/internal/logging"
)

// The audit receiver's flags: off by default, its port checked against
// the heartbeat and the other vsock services, its file only when on.
func TestAuditFlags(t *testing.T) {
	for _, tt := range []struct {
		name    string
		args    []string
		check   func(t *testing.T, c proxy.Config)
		wantErr string
	}{
		{name: "off by default", args: nil, check: func(t *testing.T, c proxy.Config) {
			if c.EnclaveAuditPort != 0 || c.AuditFile != "/var/lib/nitrosign/audit.jsonl" || c.AuditLogDecisions {
				t.Fatalf("defaults: port %d, file %q, log %v", c.EnclaveAuditPort, c.AuditFile, c.AuditLogDecisions)
			}
		}},
		{name: "on", args: []string{"--enclave-audit-port", "5052", "--audit-file", "/srv/nitrosign/audit.jsonl", "--audit-log-decisions"},
			check: func(t *testing.T, c proxy.Config) {
				if c.EnclaveAuditPort != 5052 || c.AuditFile != "/srv/nitrosign/audit.jsonl" || !c.AuditLogDecisions {
					t.Fatalf("flags not applied: port %d, file %q, log %v", c.EnclaveAuditPort, c.AuditFile, c.AuditLogDecisions)
				}
			}},
		{name: "beside every other service", args: []string{"--enclave-log-port", "5050", "--enclave-host-port", "5051",
			"--kms-forward-port", "8000", "--kms-region", "eu-west-1", "--enclave-audit-port", "5052"}, check: func(*testing.T, proxy.Config) {}},
		{name: "the heartbeat port", args: []string{"--enclave-audit-port", "9000"}, wantErr: "enclave audit port 9000 is nitro-cli's boot heartbeat"},
		{name: "the log port", args: []string{"--enclave-log-port", "5050", "--enclave-audit-port", "5050"},
			wantErr: "--enclave-log-port and --enclave-audit-port are both vsock port 5050"},
		{name: "the host port", args: []string{"--enclave-host-port", "5051", "--enclave-audit-port", "5051"},
			wantErr: "--enclave-host-port and --enclave-audit-port are both vsock port 5051"},
		{name: "the KMS port", args: []string{"--kms-forward-port", "8000", "--kms-region", "eu-west-1", "--enclave-audit-port", "8000"},
			wantErr: "--kms-forward-port and --enclave-audit-port are both vsock port 8000"},
		{name: "not a port", args: []string{"--enclave-audit-port", "-1"}, wantErr: "want a vsock port number"},
		{name: "relative file", args: []string{"--enclave-audit-port", "5052", "--audit-file", "audit.jsonl"},
			wantErr: `--audit-file: audit file "audit.jsonl": want an absolute path`},
		{name: "a directory", args: []string{"--enclave-audit-port", "5052", "--audit-file", "/var/lib/nitrosign/"}, wantErr: "want a clean path to a file"},
		{name: "the keyset file", args: []string{"--enclave-audit-port", "5052", "--enclave-host-port", "5051",
			"--audit-file", "/var/lib/nitrosign/keyset.sealed"}, wantErr: "--audit-file and --keyset-file are both /var/lib/nitrosign/keyset.sealed"},
		{name: "file unchecked while off", args: []string{"--audit-file", "relative"}, check: func(*testing.T, proxy.Config) {}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var stderr bytes.Buffer
			c, err := parseFlags(tt.args, &stderr)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !strings.Contains(stderr.String(), tt.wantErr) {
					t.Fatalf("err %v, stderr %q; want %q", err, stderr.String(), tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("%v\n%s", err, stderr.String())
			}
			tt.check(t, c)
		})
	}
}

// The unit, and its TLS drop-in, receive the audit trail on 5052 (the
// enclave's default, vsock://3:5052) into the state directory.
func TestDeployUnitAudit(t *testing.T) {
	env := map[string]string{"NITROSIGN_KMS_REGION": "eu-west-1"}
	for _, file := range []string{"../../../deploy/nitrosign-proxy.service", "../../../deploy/nitrosign-proxy.service.d/tls.conf.example"} {
		var stderr bytes.Buffer
		c, err := parseFlags(execStart(t, file, env), &stderr)
		if err != nil {
			t.Fatalf("%s: %v\n%s", file, err, stderr.String())
		}
		if c.EnclaveAuditPort != auditlog.DefaultPort || c.AuditFile != "/var/lib/nitrosign/audit.jsonl" {
			t.Errorf("%s: audit port %d, file %q", file, c.EnclaveAuditPort, c.AuditFile)
		}
	}
}

// The graph with the audit receiver on is complete, and runs: on a TCP
// loopback listener instead of vsock, it greets and logs where it is.
func TestAuditReceiverWired(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	cfg, err := parseFlags([]string{"--upstream", "tcp://127.0.0.1:1", "--listen", "127.0.0.1:0",
		"--enclave-audit-port", "5052", "--audit-file", path}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if err := fx.ValidateApp(proxy.Options(cfg)); err != nil {
		t.Fatalf("fx.ValidateApp: %v", err)
	}
	stderr := &syncBuffer{b: &bytes.Buffer{}}
	log, err := logging.New(cfg.Log, stderr)
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	app := fx.New(appOptions(cfg, log), fx.Supply(auditlog.ListenFunc(func() (net.Listener, error) { return l, nil })))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := app.Start(ctx); err != nil {
		t.Fatalf("Start: %v\n%s", err, stderr.String())
	}
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		_ = app.Stop(ctx)
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	hello, err := bufio.NewReader(c).ReadString('\n')
	_ = c.Close()
	if err := app.Stop(ctx); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	if err != nil || hello != `{"last_head":null}`+"\n" {
		t.Fatalf("first line %q, %v", hello, err)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("audit file: %v %v", fi, err)
	}
	if out := stderr.String(); !strings.Contains(out, `"msg":"receiving enclaves' audit trails"`) || !strings.Contains(out, `"file":"`+path+`"`) {
		t.Fatalf("log:\n%s", out)
	}
}

// A missing state directory stops the start with a hint.
func TestAuditStartupHint(t *testing.T) {
	path := filepath.Join(t.TempDir(), "missing", "audit.jsonl")
	var stderr bytes.Buffer
	code := run([]string{"--upstream", "tcp://127.0.0.1:1", "--listen", "127.0.0.1:0", "--enclave-audit-port", "5052", "--audit-file", path}, &stderr)
	if code != 1 || !hasErrorLine(t, stderr.String(), "audit file directory", "the directory of --audit-file must exist") {
		t.Fatalf("exit %d:\n%s", code, stderr.String())
	}
}
