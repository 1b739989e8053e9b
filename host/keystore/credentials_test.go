package keystore_test

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/nitrosign/nitrosign/host/keystore"
)

// Credentials the fake IMDS hands out: recognisable, so that a test can
// look for them in logs and errors.
const (
	fakeRole      = "nitrosign-parent"
	fakeKeyID     = "ASIAFAKEACCESSKEY123"
	fakeSecret    = "fakeSecret/ThatMustNeverBeLogged+0123456789"
	fakeToken     = "FakeSessionToken//ThatMustNeverBeLogged=="
	fakeIMDSToken = "fake-imds-session-token"
)

// fakeIMDS is an IMDSv2 of our own: a session token from PUT
// /latest/api/token (with its TTL header), required on every GET; the
// instance role's name and credentials as EC2 serves them.
type fakeIMDS struct {
	srv *httptest.Server

	mu          sync.Mutex
	tokens      int // PUTs answered with a token
	noToken     int // GETs refused for want of the token
	credGets    int // credential documents served
	refuseToken bool
	// expiries are the expirations of the successive credentials
	// documents (the last one repeats); default six hours from now.
	expiries []time.Time
}

func newFakeIMDS(t *testing.T) *fakeIMDS {
	t.Helper()
	f := &fakeIMDS{}
	f.srv = httptest.NewServer(http.HandlerFunc(f.serve))
	t.Cleanup(func() {
		f.srv.CloseClientConnections()
		f.srv.Close()
	})
	return f
}

func (f *fakeIMDS) serve(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if r.Method == http.MethodPut && r.URL.Path == "/latest/api/token" {
		if f.refuseToken {
			http.Error(w, "forbidden", http.StatusForbidden)
			return
		}
		if r.Header.Get("X-aws-ec2-metadata-token-ttl-seconds") == "" {
			http.Error(w, "missing TTL", http.StatusBadRequest)
			return
		}
		f.tokens++
		w.Header().Set("X-aws-ec2-metadata-token-ttl-seconds", r.Header.Get("X-aws-ec2-metadata-token-ttl-seconds"))
		_, _ = w.Write([]byte(fakeIMDSToken))
		return
	}
	if r.Method != http.MethodGet {
		http.Error(w, "method", http.StatusMethodNotAllowed)
		return
	}
	if r.Header.Get("X-aws-ec2-metadata-token") != fakeIMDSToken {
		f.noToken++
		http.Error(w, "unauthorized", http.StatusUnauthorized)
		return
	}
	switch r.URL.Path {
	case "/latest/meta-data/iam/security-credentials/":
		_, _ = w.Write([]byte(fakeRole))
	case "/latest/meta-data/iam/security-credentials/" + fakeRole:
		exp := time.Now().Add(6 * time.Hour)
		if n := len(f.expiries); n > 0 {
			exp = f.expiries[min(f.credGets, n-1)]
		}
		f.credGets++
		_ = json.NewEncoder(w).Encode(map[string]string{
			"Code": "Success", "LastUpdated": time.Now().UTC().Format(time.RFC3339), "Type": "AWS-HMAC",
			"AccessKeyId": fakeKeyID, "SecretAccessKey": fakeSecret, "Token": fakeToken,
			"Expiration": exp.UTC().Format(time.RFC3339),
		})
	default:
		http.NotFound(w, r)
	}
}

func (f *fakeIMDS) counts() (tokens, noToken, credGets int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.tokens, f.noToken, f.credGets
}

// isolateAWSEnv leaves the SDK nothing but IMDS: no credentials in the
// environment, no shared files, no other source.
func isolateAWSEnv(t *testing.T) {
	t.Helper()
	none := filepath.Join(t.TempDir(), "does-not-exist")
	for _, k := range []string{"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
		"AWS_EC2_METADATA_SERVICE_ENDPOINT", "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", "AWS_EC2_METADATA_DISABLED", "AWS_EC2_METADATA_V1_DISABLED",
		"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN", "AWS_REGION", "AWS_DEFAULT_REGION"} {
		t.Setenv(k, "")
	}
	t.Setenv("AWS_CONFIG_FILE", none)
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", none)
}

func loadFromIMDS(t *testing.T, f *fakeIMDS, log *zap.Logger) *keystore.Credentials {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := keystore.LoadCredentials(ctx, log, config.WithEC2IMDSEndpoint(f.srv.URL))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// The official SDK's chain finds the instance role's credentials through
// IMDSv2, token first, pointed at our IMDS only by its endpoint setting.
func TestCredentialsFromIMDSv2(t *testing.T) {
	isolateAWSEnv(t)
	imds := newFakeIMDS(t)
	core, logs := observer.New(zap.DebugLevel)
	c := loadFromIMDS(t, imds, zap.New(core))
	if !strings.Contains(c.Where(), "IMDSv2 at "+imds.srv.URL) || !strings.Contains(c.Where(), "does-not-exist (AWS_CONFIG_FILE)") {
		t.Fatalf("Where = %q", c.Where())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	got, err := c.Retrieve(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got.AccessKeyID != fakeKeyID || got.SecretAccessKey != fakeSecret || got.SessionToken != fakeToken || !got.CanExpire {
		t.Fatalf("credentials from IMDS differ (key id %q, expiring %v)", got.AccessKeyID, got.CanExpire)
	}
	// ec2rolecreds caps the expiry at an hour, so that it refreshes.
	if d := time.Until(got.Expires); d < 50*time.Minute || d > 6*time.Hour {
		t.Fatalf("expires in %v", d)
	}
	tokens, noToken, credGets := imds.counts()
	if tokens < 1 || noToken != 0 || credGets != 1 {
		t.Fatalf("IMDS saw %d token PUTs, %d GETs without the token, %d credential GETs", tokens, noToken, credGets)
	}
	// Cached: a second retrieval asks IMDS nothing.
	if _, err := c.Retrieve(ctx); err != nil {
		t.Fatal(err)
	}
	if _, _, credGets := imds.counts(); credGets != 1 {
		t.Fatalf("credential GETs %d after a cached retrieval", credGets)
	}
	assertNoSecretLogged(t, logs)
}

// IMDSv1 is never used: when IMDS refuses a session token, there are no
// credentials, and the error says where the host looked.
func TestCredentialsNoIMDSv1Fallback(t *testing.T) {
	isolateAWSEnv(t)
	imds := newFakeIMDS(t)
	imds.refuseToken = true
	c := loadFromIMDS(t, imds, zap.NewNop())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := c.Retrieve(ctx)
	var ce *keystore.CredentialsError
	if !errors.As(err, &ce) || !errors.Is(err, keystore.ErrNoCredentials) {
		t.Fatalf("Retrieve = %v, want a CredentialsError", err)
	}
	for _, want := range []string{"the environment (AWS_ACCESS_KEY_ID", "AWS_SHARED_CREDENTIALS_FILE", "IMDSv2 at " + imds.srv.URL} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
	if ce.Cause() == nil {
		t.Fatal("no cause for the log")
	}
	if _, noToken, credGets := imds.counts(); noToken != 0 || credGets != 0 {
		t.Fatalf("the SDK fell back to IMDSv1: %d GETs without a token", noToken)
	}
}

// Credentials about to expire are refreshed before they are handed out:
// the enclave asks again five minutes before the expiry it is given.
func TestCredentialsNearExpiryRefreshed(t *testing.T) {
	isolateAWSEnv(t)
	imds := newFakeIMDS(t)
	imds.expiries = []time.Time{time.Now().Add(3 * time.Minute), time.Now().Add(6 * time.Hour)}
	c := loadFromIMDS(t, imds, zap.NewNop())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	got, err := c.Retrieve(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if d := time.Until(got.Expires); d < 50*time.Minute {
		t.Fatalf("handed out credentials expiring in %v", d)
	}
	if _, _, credGets := imds.counts(); credGets != 2 {
		t.Fatalf("credential GETs %d, want 2", credGets)
	}
}

// Static credentials from the environment (development) do not expire.
func TestCredentialsFromEnvironment(t *testing.T) {
	isolateAWSEnv(t)
	t.Setenv("AWS_ACCESS_KEY_ID", fakeKeyID)
	t.Setenv("AWS_SECRET_ACCESS_KEY", fakeSecret)
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := keystore.LoadCredentials(ctx, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	got, err := c.Retrieve(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got.AccessKeyID != fakeKeyID || got.SecretAccessKey != fakeSecret || got.CanExpire {
		t.Fatalf("environment credentials: key id %q, expiring %v", got.AccessKeyID, got.CanExpire)
	}
	if !strings.Contains(c.Where(), "not the EC2 instance role (AWS_EC2_METADATA_DISABLED=true)") {
		t.Fatalf("Where = %q", c.Where())
	}
}

// A source that fails or hands out nothing usable is an error, within the
// timeout.
func TestCredentialsFailures(t *testing.T) {
	for _, tt := range []struct {
		name string
		p    aws.CredentialsProviderFunc
		want string
	}{
		{"error", func(context.Context) (aws.Credentials, error) { return aws.Credentials{}, errors.New("boom") }, "boom"},
		{"empty", func(context.Context) (aws.Credentials, error) { return aws.Credentials{Source: "x"}, nil }, "empty credentials"},
		{"expired", func(context.Context) (aws.Credentials, error) {
			return aws.Credentials{AccessKeyID: "a", SecretAccessKey: "b", CanExpire: true, Expires: time.Now().Add(-time.Minute)}, nil
		}, "expired at"},
		{"slow", func(ctx context.Context) (aws.Credentials, error) { <-ctx.Done(); return aws.Credentials{}, ctx.Err() }, "deadline exceeded"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := keystore.NewCredentials(tt.p, "a test source")
			c.SetTimeout(50 * time.Millisecond)
			_, err := c.Retrieve(context.Background())
			var ce *keystore.CredentialsError
			if !errors.As(err, &ce) || !strings.Contains(ce.Cause().Error(), tt.want) || !strings.Contains(err.Error(), "looked in a test source") {
				t.Fatalf("Retrieve = %v (cause %v), want cause %q", err, ce, tt.want)
			}
		})
	}
}

// assertNoSecretLogged fails when any logged line, message or field,
// holds a credential value or a sealed keyset's bytes.
func assertNoSecretLogged(t *testing.T, logs *observer.ObservedLogs, sealedKeysets ...[]byte) {
	t.Helper()
	secrets := []string{fakeSecret, fakeToken, fakeKeyID, fakeIMDSToken}
	for _, s := range sealedKeysets {
		secrets = append(secrets, encodings(s)...)
	}
	for _, e := range logs.All() {
		line := e.Message
		if b, err := json.Marshal(e.ContextMap()); err == nil {
			line += " " + string(b)
		} else {
			t.Fatalf("log fields do not encode: %v", err)
		}
		for _, s := range secrets {
			if strings.Contains(line, s) {
				t.Fatalf("a log line holds a secret or keyset bytes: %s", line)
			}
		}
	}
}
