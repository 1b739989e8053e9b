package sealing

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	"go.uber.org/goleak"
	"go.uber.org/zap"

	"github.com/nitrosign/nitrosign/enclave/attest"
	"github.com/nitrosign/nitrosign/enclave/recipient"
	"github.com/nitrosign/nitrosign/fakes/kmsfake"
)

var recipientDecrypt = recipient.Decrypt

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

type fixture struct {
	fake *kmsfake.KMS
	keys *DataKeys
	nsm  attest.NSM
	srv  *httptest.Server
}

// newFixture runs the fake KMS and a DataKeys on the official client,
// pointed at it by its endpoint setting only; the enclave's documents come
// from the simulated NSM.
func newFixture(t *testing.T, secret string) *fixture {
	t.Helper()
	nsm, err := attest.Open(attest.Config{DevSimulatedNSM: true, DevicePath: "/nonexistent/nsm"}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = nsm.Close() })
	root, err := x509.ParseCertificate(nsm.(attest.Simulation).DevRootDER())
	if err != nil {
		t.Fatal(err)
	}
	fake := kmsfake.New(root, map[uint][]byte{0: attest.SimulatedPCRs()[0]})
	srv := httptest.NewServer(fake)
	t.Cleanup(srv.Close)
	creds := kmsfake.Credentials()
	if secret != "" {
		creds.SecretAccessKey = secret
	}
	client := kms.New(kms.Options{
		Region:       kmsfake.Region,
		BaseEndpoint: aws.String(srv.URL),
		Credentials: aws.CredentialsProviderFunc(func(context.Context) (aws.Credentials, error) {
			return creds, nil
		}),
		RetryMaxAttempts: 1,
	})
	keys, err := NewDataKeys(client, nsm, kmsfake.KeyARN)
	if err != nil {
		t.Fatal(err)
	}
	return &fixture{fake: fake, keys: keys, nsm: nsm, srv: srv}
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

// A data key generated for the enclave opens again, from its blob, in
// this enclave (or any with the same measurements); KMS never sent it in
// clear.
func TestGenerateThenOpen(t *testing.T) {
	f := newFixture(t, "")
	key, blob, arn, err := f.keys.Generate(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if len(key) != DataKeySize || len(blob) == 0 || bytes.Contains(blob, key) || arn != kmsfake.KeyARN {
		t.Fatalf("key %d bytes, blob %d bytes, key ARN %q", len(key), len(blob), arn)
	}
	again, arn2, err := f.keys.Open(ctx(t), blob)
	if err != nil {
		t.Fatal(err)
	}
	if arn2 != arn {
		t.Fatalf("opened with %q, generated under %q", arn2, arn)
	}
	if !bytes.Equal(again, key) {
		t.Fatal("Open returned another key than Generate")
	}
	if got := f.fake.Called(); got != "[GenerateDataKey Decrypt]" {
		t.Fatalf("KMS calls %s", got)
	}
}

// Every way KMS can refuse, or misbehave, is an error that says which.
func TestRefusals(t *testing.T) {
	f := newFixture(t, "")
	_, blob, _, err := f.keys.Generate(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	check := func(name string, err error, want ...string) {
		t.Helper()
		if err == nil {
			t.Fatalf("%s: no error", name)
		}
		for _, w := range want {
			if !strings.Contains(err.Error(), w) {
				t.Fatalf("%s: %v\nwant it to name %q", name, err, w)
			}
		}
		t.Logf("%s: %v", name, err)
	}

	// The key policy's PCR0 is another image's.
	f.fake.SetPCRs(map[uint][]byte{0: bytes.Repeat([]byte{7}, 48)})
	_, _, err = f.keys.Open(ctx(t), blob)
	check("another image", err, "Decrypt", "AccessDeniedException", "PCR")
	f.fake.SetPCRs(map[uint][]byte{0: attest.SimulatedPCRs()[0]})

	corrupt := append([]byte(nil), blob...)
	corrupt[len(corrupt)-1] ^= 1
	_, _, err = f.keys.Open(ctx(t), corrupt)
	check("corrupt blob", err, "InvalidCiphertextException")
	if !errors.Is(err, ErrKMS) {
		t.Fatalf("corrupt blob: %v does not wrap ErrKMS", err)
	}

	other, err := NewDataKeys(f.keys.kms, f.nsm, "arn:aws:kms:eu-west-1:111122223333:key/another")
	if err != nil {
		t.Fatal(err)
	}
	_, _, err = other.Open(ctx(t), blob)
	check("blob of another KMS key", err, "IncorrectKeyException")

	f.fake.SetMisbehave("plaintext")
	_, _, _, err = f.keys.Generate(ctx(t))
	check("KMS sends the key in clear", err, "in clear despite the Recipient")
	f.fake.SetMisbehave("other-recipient")
	_, _, err = f.keys.Open(ctx(t), blob)
	check("KMS encrypts to another key", err, "CiphertextForRecipient", "cannot decrypt")
	f.fake.SetMisbehave("")

	bad := newFixture(t, "a stolen but wrong secret")
	_, _, _, err = bad.keys.Generate(ctx(t))
	check("wrong credentials", err, "InvalidSignatureException")

	// A blob whose encryption context is not the keysets' (made for
	// something else) does not open.
	saved := EncryptionContext
	EncryptionContext = map[string]string{"nitrosign:purpose": "something-else"}
	_, _, err = f.keys.Open(ctx(t), blob)
	EncryptionContext = saved
	check("another encryption context", err, "InvalidCiphertextException")

	f.srv.Close()
	_, _, err = f.keys.Open(ctx(t), blob)
	check("KMS unreachable", err, "AWS KMS Decrypt")
}

func TestNewDataKeysNeedsEverything(t *testing.T) {
	nsm := fakeAttester{}
	client := kms.New(kms.Options{Region: "eu-west-1"})
	for _, tt := range []struct {
		c   KMS
		n   Attester
		key string
	}{{nil, nsm, "k"}, {client, nil, "k"}, {client, nsm, ""}} {
		if _, err := NewDataKeys(tt.c, tt.n, tt.key); err == nil {
			t.Errorf("NewDataKeys(%v, %v, %q) succeeded", tt.c != nil, tt.n != nil, tt.key)
		}
	}
}

type fakeAttester struct{}

func (fakeAttester) Attestation(_, _, _ []byte) ([]byte, error) { return nil, errors.New("no NSM") }

// The test server's envelope is checked by code independent of both it and
// package recipient: OpenSSL's cms -decrypt opens it to the same data key.
func TestEnvelopeOpensWithOpenSSL(t *testing.T) {
	bin, err := exec.LookPath("openssl")
	if err != nil {
		t.Fatal("openssl not found: install it (apt-get install openssl); this test cross-checks the CMS envelope with it")
	}
	priv, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	f := kmsfake.New(nil, nil)
	dk := bytes.Repeat([]byte{0x5a}, 32)
	env := f.Envelope(dk, &priv.PublicKey)
	dir := t.TempDir()
	pkcs8, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	keyFile, envFile := filepath.Join(dir, "key.pem"), filepath.Join(dir, "env.der")
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: pkcs8}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(envFile, env, 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(bin, "cms", "-decrypt", "-inform", "DER", "-in", envFile, "-inkey", keyFile, "-binary").Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			t.Fatalf("openssl cms -decrypt: %v: %s", err, ee.Stderr)
		}
		t.Fatal(err)
	}
	if !bytes.Equal(out, dk) {
		t.Fatalf("openssl opened the envelope to %x, want %x", out, dk)
	}
	// And package recipient agrees.
	got, err := recipientDecrypt(env, priv)
	if err != nil || !bytes.Equal(got, dk) {
		t.Fatalf("recipient.Decrypt = %x, %v", got, err)
	}
}
