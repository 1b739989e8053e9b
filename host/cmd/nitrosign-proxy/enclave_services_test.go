package main

import (
	"bytes"
	"context"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/fx"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/nitrosign/nitrosign/host/keystore"
	"github.com/nitrosign/nitrosign/host/proxy"
	"github.com/nitrosign/nitrosign/internal/logging"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// The graph main runs with the unit's enclave services on is complete.
func TestValidateAppEnclaveServices(t *testing.T) {
	cfg, err := parseFlags([]string{"--enclave-log-port", "5050", "--enclave-host-port", "5051", "--kms-forward-port", "8000", "--kms-region", "eu-west-1"}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if err := fx.ValidateApp(proxy.Options(cfg)); err != nil {
		t.Fatalf("fx.ValidateApp: %v", err)
	}
}

// The binary's graph with the host service and the KMS forwarder on, each
// on a TCP loopback listener instead of vsock: the keyset is served from
// --keyset-file, credentials come from the SDK's chain (here the
// environment), and the forwarder relays to --kms-endpoint; start-up logs
// where each one is, and never a credential.
func TestEnclaveServicesWired(t *testing.T) {
	for _, k := range []string{"AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"} {
		t.Setenv(k, "")
	}
	none := filepath.Join(t.TempDir(), "none")
	t.Setenv("AWS_CONFIG_FILE", none)
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", none)
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	const secret = "wired/SecretAccessKey+NeverLogged"
	t.Setenv("AWS_ACCESS_KEY_ID", "AKIAWIREDTEST")
	t.Setenv("AWS_SECRET_ACCESS_KEY", secret)

	// The "KMS endpoint": echoes what it gets.
	kms, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer kms.Close()
	go func() {
		for {
			c, err := kms.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); _, _ = io.Copy(c, c) }()
		}
	}()

	keyset := filepath.Join(t.TempDir(), "keyset.sealed")
	stderr := &syncBuffer{b: &bytes.Buffer{}}
	cfg, err := parseFlags([]string{"--upstream", "tcp://127.0.0.1:1", "--listen", "127.0.0.1:0", "--log-level", "debug",
		"--enclave-host-port", "5051", "--keyset-file", keyset, "--kms-forward-port", "8000", "--kms-endpoint", kms.Addr().String()}, stderr)
	if err != nil {
		t.Fatalf("parseFlags: %v\n%s", err, stderr.String())
	}
	log, err := logging.New(cfg.Log, stderr)
	if err != nil {
		t.Fatal(err)
	}
	hostL, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	kmsL, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	app := fx.New(appOptions(cfg, log),
		fx.Supply(keystore.ListenFunc(func() (net.Listener, error) { return hostL, nil })),
		fx.Supply(proxy.KMSForwardListen(func() (net.Listener, error) { return kmsL, nil })),
	)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := app.Start(ctx); err != nil {
		t.Fatalf("Start: %v\n%s", err, stderr.String())
	}
	stopped := false
	defer func() {
		if !stopped {
			_ = app.Stop(ctx)
		}
	}()

	cc, err := grpc.NewClient("passthrough:///"+hostL.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	host := pb.NewHostServiceClient(cc)
	got, err := host.GetSealedKeyset(ctx, &pb.GetSealedKeysetRequest{})
	if err != nil || got.GetLocation() != keyset || len(got.GetSealed()) != 0 {
		t.Fatalf("GetSealedKeyset: %v, %+v", err, got)
	}
	creds, err := host.GetCredentials(ctx, &pb.GetCredentialsRequest{})
	if err != nil || creds.GetSecretAccessKey() != secret || creds.GetExpiration() != nil {
		t.Fatalf("GetCredentials: %v (expiration %v)", err, creds.GetExpiration())
	}

	c, err := net.Dial("tcp", kmsL.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("client hello")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len("client hello"))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "client hello" {
		t.Fatalf("through the KMS forwarder: %q, %v", buf, err)
	}
	_ = c.Close()

	if err := app.Stop(ctx); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	stopped = true
	out := stderr.String()
	for _, want := range []string{
		`"msg":"serving the enclaves' host service: sealed keyset and AWS credentials"`, `"keyset_file":"` + keyset + `"`,
		`"msg":"forwarding the enclaves' KMS connections"`, `"destination":"` + kms.Addr().String() + `"`,
		`"msg":"no sealed keyset yet"`, `"msg":"AWS credentials for enclaves available"`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("log has no %s", want)
		}
	}
	if strings.Contains(out, secret) {
		t.Fatal("a credential reached the log")
	}
	if t.Failed() {
		t.Log(out)
	}
}
