package keystore_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/nitrosign/nitrosign/host/keystore"
	"github.com/nitrosign/nitrosign/internal/keysetfmt"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

type serverFixture struct {
	path   string
	addr   string
	client pb.HostServiceClient
	logs   *observer.ObservedLogs
}

// startServer serves HostService on a TCP loopback listener with creds.
func startServer(t *testing.T, cfg keystore.Config, creds *keystore.Credentials) *serverFixture {
	t.Helper()
	core, logs := observer.New(zap.DebugLevel)
	log := zap.New(core)
	if cfg.Path == "" {
		cfg.Path = filepath.Join(t.TempDir(), "keyset.sealed")
	}
	store, err := keystore.NewStore(cfg.Path, log)
	if err != nil {
		t.Fatal(err)
	}
	srv := keystore.NewServer(cfg, store, creds, log)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Stop(ctx)
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	cc, err := grpc.NewClient("passthrough:///"+l.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(keystore.MaxMsgSize), grpc.MaxCallSendMsgSize(4*keystore.MaxMsgSize)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cc.Close() })
	return &serverFixture{path: cfg.Path, addr: l.Addr().String(), client: pb.NewHostServiceClient(cc), logs: logs}
}

func callCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func wantCode(t *testing.T, err error, code codes.Code, msg string) {
	t.Helper()
	st, _ := status.FromError(err)
	if st.Code() != code || !strings.Contains(st.Message(), msg) {
		t.Fatalf("status %v %q, want %v containing %q", st.Code(), st.Message(), code, msg)
	}
}

func staticCreds(expires time.Time) *keystore.Credentials {
	return keystore.NewCredentials(aws.CredentialsProviderFunc(func(context.Context) (aws.Credentials, error) {
		c := aws.Credentials{AccessKeyID: fakeKeyID, SecretAccessKey: fakeSecret, SessionToken: fakeToken, Source: "test"}
		if !expires.IsZero() {
			c.CanExpire, c.Expires = true, expires
		}
		return c, nil
	}), "a test source")
}

// The service over a real listener with the generated client: the
// keyset's whole life, as an enclave sees it.
func TestServiceKeysetLifecycle(t *testing.T) {
	f := startServer(t, keystore.Config{}, staticCreds(time.Time{}))
	ctx := callCtx(t)

	got, err := f.client.GetSealedKeyset(ctx, &pb.GetSealedKeysetRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(got.GetSealed()) != 0 || got.GetInitRequested() || got.GetLocation() != f.path {
		t.Fatalf("no keyset: got %d bytes, init %v, location %q", len(got.GetSealed()), got.GetInitRequested(), got.GetLocation())
	}
	v1 := sealed(t, "01")
	_, err = f.client.PutSealedKeyset(ctx, &pb.PutSealedKeysetRequest{Sealed: v1})
	wantCode(t, err, codes.FailedPrecondition, "nitrosign keyset init")

	if _, err := keystore.RequestInit(f.path, time.Now()); err != nil {
		t.Fatal(err)
	}
	got, err = f.client.GetSealedKeyset(ctx, &pb.GetSealedKeysetRequest{})
	if err != nil || !got.GetInitRequested() || len(got.GetSealed()) != 0 {
		t.Fatalf("after init: %v, init %v", err, got.GetInitRequested())
	}
	put, err := f.client.PutSealedKeyset(ctx, &pb.PutSealedKeysetRequest{Sealed: v1})
	if err != nil {
		t.Fatal(err)
	}
	if put.GetLocation() != f.path || put.GetPreviousLocation() != "" {
		t.Fatalf("first put: %+v", put)
	}
	got, err = f.client.GetSealedKeyset(ctx, &pb.GetSealedKeysetRequest{})
	if err != nil || !bytes.Equal(got.GetSealed(), v1) || got.GetInitRequested() {
		t.Fatalf("after the first put: %v, init %v", err, got.GetInitRequested())
	}

	// A second enclave that also saw the init request loses the race.
	_, err = f.client.PutSealedKeyset(ctx, &pb.PutSealedKeysetRequest{Sealed: sealed(t, "other")})
	wantCode(t, err, codes.Aborted, "already holds a keyset")

	v2 := sealed(t, "02")
	put, err = f.client.PutSealedKeyset(ctx, &pb.PutSealedKeysetRequest{Sealed: v2, ReplacesSha256: sum(v1)})
	if err != nil {
		t.Fatal(err)
	}
	if put.GetPreviousLocation() != keystore.PrevPath(f.path) {
		t.Fatalf("rotation: %+v", put)
	}
	// Stale: another enclave rotated first.
	_, err = f.client.PutSealedKeyset(ctx, &pb.PutSealedKeysetRequest{Sealed: sealed(t, "03"), ReplacesSha256: sum(v1)})
	wantCode(t, err, codes.Aborted, "another enclave changed it first")
	if b, _ := os.ReadFile(f.path); !bytes.Equal(b, v2) {
		t.Fatal("a stale put overwrote the keyset")
	}
	if b, _ := os.ReadFile(keystore.PrevPath(f.path)); !bytes.Equal(b, v1) {
		t.Fatal("the previous keyset is not kept")
	}
}

func TestServiceRefusals(t *testing.T) {
	f := startServer(t, keystore.Config{}, staticCreds(time.Time{}))
	ctx := callCtx(t)
	_, err := f.client.PutSealedKeyset(ctx, &pb.PutSealedKeysetRequest{Sealed: []byte("garbage")})
	wantCode(t, err, codes.InvalidArgument, "not a sealed keyset")

	// Over a keyset's size but within the message bound: the store's
	// words. Over the message bound: the transport's.
	big := append(sealed(t), make([]byte, keysetfmt.MaxSize)...)[:keysetfmt.MaxSize+1]
	_, err = f.client.PutSealedKeyset(ctx, &pb.PutSealedKeysetRequest{Sealed: big})
	wantCode(t, err, codes.InvalidArgument, "at most 1048576")
	_, err = f.client.PutSealedKeyset(ctx, &pb.PutSealedKeysetRequest{Sealed: make([]byte, keystore.MaxMsgSize+1)})
	wantCode(t, err, codes.ResourceExhausted, "")

	_, err = f.client.PutSealedKeyset(ctx, &pb.PutSealedKeysetRequest{Sealed: sealed(t), ReplacesSha256: []byte{1, 2, 3}})
	wantCode(t, err, codes.InvalidArgument, "replaces_sha256 is 3 bytes")

	if err := os.WriteFile(f.path, make([]byte, keysetfmt.MaxSize+10), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = f.client.GetSealedKeyset(ctx, &pb.GetSealedKeysetRequest{})
	wantCode(t, err, codes.FailedPrecondition, "is 1048586 bytes")

	if err := os.WriteFile(f.path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = f.client.GetSealedKeyset(ctx, &pb.GetSealedKeysetRequest{})
	wantCode(t, err, codes.FailedPrecondition, "is empty")

	// A corrupt file is handed over as it is.
	if err := os.WriteFile(f.path, []byte("corrupt"), 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := f.client.GetSealedKeyset(ctx, &pb.GetSealedKeysetRequest{})
	if err != nil || string(got.GetSealed()) != "corrupt" {
		t.Fatalf("corrupt file: %v, %q", err, got.GetSealed())
	}
}

func TestServiceCredentials(t *testing.T) {
	ctx := callCtx(t)
	t.Run("expiring", func(t *testing.T) {
		exp := time.Now().Add(time.Hour).Truncate(time.Second)
		f := startServer(t, keystore.Config{}, staticCreds(exp))
		c, err := f.client.GetCredentials(ctx, &pb.GetCredentialsRequest{})
		if err != nil {
			t.Fatal(err)
		}
		if c.GetAccessKeyId() != fakeKeyID || c.GetSecretAccessKey() != fakeSecret || c.GetSessionToken() != fakeToken || !c.GetExpiration().AsTime().Equal(exp) {
			t.Fatalf("credentials differ (expiration %v, want %v)", c.GetExpiration().AsTime(), exp)
		}
	})
	t.Run("not expiring", func(t *testing.T) {
		f := startServer(t, keystore.Config{}, staticCreds(time.Time{}))
		c, err := f.client.GetCredentials(ctx, &pb.GetCredentialsRequest{})
		if err != nil {
			t.Fatal(err)
		}
		if c.GetExpiration() != nil {
			t.Fatalf("expiration %v set for credentials that do not expire", c.GetExpiration())
		}
	})
	t.Run("none", func(t *testing.T) {
		failing := keystore.NewCredentials(aws.CredentialsProviderFunc(func(context.Context) (aws.Credentials, error) {
			return aws.Credentials{}, errors.New("no EC2 IMDS role found")
		}), "the test's nowhere")
		f := startServer(t, keystore.Config{}, failing)
		for range 3 {
			_, err := f.client.GetCredentials(ctx, &pb.GetCredentialsRequest{})
			wantCode(t, err, codes.Unavailable, "the host looked in the test's nowhere")
			if strings.Contains(err.Error(), "no EC2 IMDS role found") {
				t.Fatal("the SDK's cause went to the enclave; it belongs in the host's log")
			}
		}
		causes := f.logs.FilterMessage("no AWS credentials for the enclave").All()
		if len(causes) != 1 || causes[0].ContextMap()["cause"] != "no EC2 IMDS role found" {
			t.Fatalf("want the cause logged once (throttled): %v", f.logs.All())
		}
	})
}

// The full IMDSv2 path through the service, and what the logs hold: at
// debug level, no line holds a credential or a keyset's sealed bytes.
func TestServiceLogsHoldNoSecret(t *testing.T) {
	isolateAWSEnv(t)
	imds := newFakeIMDS(t)
	core, logs := observer.New(zap.DebugLevel)
	creds := loadFromIMDS(t, imds, zap.New(core))
	f := startServer(t, keystore.Config{}, creds)
	ctx := callCtx(t)

	c, err := f.client.GetCredentials(ctx, &pb.GetCredentialsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if c.GetSecretAccessKey() != fakeSecret || c.GetExpiration() == nil {
		t.Fatal("credentials through the service differ from IMDS's")
	}
	if _, err := keystore.RequestInit(f.path, time.Now()); err != nil {
		t.Fatal(err)
	}
	v1, v2 := sealed(t, "01"), sealed(t, "02")
	if _, err := f.client.PutSealedKeyset(ctx, &pb.PutSealedKeysetRequest{Sealed: v1}); err != nil {
		t.Fatal(err)
	}
	if _, err := f.client.PutSealedKeyset(ctx, &pb.PutSealedKeysetRequest{Sealed: v2, ReplacesSha256: sum(v1)}); err != nil {
		t.Fatal(err)
	}
	_, err = f.client.PutSealedKeyset(ctx, &pb.PutSealedKeysetRequest{Sealed: sealed(t, "03"), ReplacesSha256: sum(v1)})
	wantCode(t, err, codes.Aborted, "")
	if _, err := f.client.GetSealedKeyset(ctx, &pb.GetSealedKeysetRequest{}); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(f.path, v1[:len(v1)/2], 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := f.client.GetSealedKeyset(ctx, &pb.GetSealedKeysetRequest{}); err != nil {
		t.Fatal(err)
	}
	if f.logs.FilterMessage("host service call").Len() < 4 || f.logs.FilterMessage("stored a new sealed keyset").Len() != 2 {
		t.Fatalf("too few lines to prove anything: %v", f.logs.All())
	}
	assertNoSecretLogged(t, logs, v1, v2)
	assertNoSecretLogged(t, f.logs, v1, v2)
}

// encodings are the forms a keyset's sealed bytes (data key blob, nonce,
// ciphertext; the header is readable on purpose) could take in a log line.
func encodings(sealed []byte) []string {
	p, err := keysetfmt.Parse(sealed)
	if err != nil {
		return []string{base64.StdEncoding.EncodeToString(sealed), hex.EncodeToString(sealed)}
	}
	var out []string
	for _, part := range [][]byte{p.Blob, p.Nonce, p.Ciphertext, sealed} {
		out = append(out, base64.StdEncoding.EncodeToString(part), base64.RawURLEncoding.EncodeToString(part), hex.EncodeToString(part))
		if len(part) >= 12 {
			out = append(out, hex.EncodeToString(part[:12]), base64.StdEncoding.EncodeToString(part[:12]))
		}
	}
	return out
}

// Anything on the parent can connect: garbage, silence and too many
// connections neither crash nor hang the service, and a good client is
// served after them.
func TestServiceHostileConnections(t *testing.T) {
	f := startServer(t, keystore.Config{MaxConns: 2, HandshakeTimeout: 500 * time.Millisecond}, staticCreds(time.Time{}))

	// Two silent connections take both slots (each is served: the server
	// sends its SETTINGS); a third is closed at once, without a byte.
	var silent []net.Conn
	for range 2 {
		c, err := net.Dial("tcp", f.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err != nil {
			t.Fatalf("silent connection not served: %v", err)
		}
		silent = append(silent, c)
	}
	third, err := net.Dial("tcp", f.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer third.Close()
	_ = third.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := third.Read(make([]byte, 1)); n != 0 || !errors.Is(err, io.EOF) && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("third connection: %d bytes, %v; want it closed at once", n, err)
	}
	// The silent ones are closed after the handshake timeout.
	for _, c := range silent {
		if _, err := io.Copy(io.Discard, c); err != nil && !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("silent connection not closed after the handshake timeout: %v", err)
		}
	}
	if f.logs.FilterMessageSnippet("connection refused: too many open").Len() == 0 {
		t.Fatal("the refused connection was not logged")
	}

	// Garbage instead of the HTTP/2 preface: the connection is closed.
	g, err := net.Dial("tcp", f.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	_, _ = g.Write(bytes.Repeat([]byte("GET / HTTP/1.1\r\n\r\n\x00\xff"), 64))
	_ = g.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.Copy(io.Discard, g); err != nil && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("garbage connection not closed: %v", err)
	}

	// And an enclave is served (once the slots are given back).
	ctx := callCtx(t)
	var lastErr error
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if _, lastErr = f.client.GetSealedKeyset(ctx, &pb.GetSealedKeysetRequest{}); lastErr == nil {
			return
		}
	}
	t.Fatalf("no call served after the hostile connections: %v", lastErr)
}
