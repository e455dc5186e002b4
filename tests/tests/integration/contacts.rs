use crm_tests::harness::TestApp;
use serde_json::{json, Value};

#[tokio::test]
async fn create_then_read_your_write() {
    let app = TestApp::spawn().await;
    let (id, pos) = app
        .create_contact(&json!({"given_name": "Ada", "email": "ada@example.com"}))
        .await;
    let r = app
        .get(&format!("/v1/contacts/{id}?min_position={pos}"))
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["given_name"], "Ada");
    assert_eq!(v["version"], 1);
    app.stop().await;
}
