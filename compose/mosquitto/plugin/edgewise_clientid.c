/*
 * edgewise_clientid: a Mosquitto 2 (plugin interface v5) plugin that binds a connection's client
 * id to its username, so one principal cannot take over another principal's session.
 *
 * Rule (docs/security.md, "Connection identity"): a client that authenticates with username U
 * is refused unless its client id is exactly U or starts with "U:". ':' can never be part of a
 * Mosquitto username (the password file uses it as its separator), so "U:" cannot be the
 * prefix of another principal's ids: gw-1 may use "gw-1:edgewise-node-gw-1", never "gw-1-esc"
 * or "gw-1-esc:x". A principal may hold several connections (U, U:a, U:b, ...).
 *
 * Anything the rule allows is deferred (MOSQ_ERR_PLUGIN_DEFER): the password file (and
 * allow_anonymous) still decide whether the credentials are good. A refused client gets CONNACK
 * "not authorised" (MQTT 3.1.1 code 5, MQTT 5 reason 0x87) and the broker log gets one line
 * naming its client id and username (never the password; bytes other than printable ASCII
 * shown as '?', each cut at 128 bytes).
 *
 * Mosquitto 2.0.11 (Debian 12, eclipse-mosquitto:2) runs a v5 plugin's MOSQ_EVT_BASIC_AUTH
 * callback before its password-file check; tests/test_broker_security.py proves both that order
 * and the refusals against a real broker.
 *
 * Build (dev.sh does it for the tests; compose/mosquitto/Dockerfile for the compose brokers):
 *   cc -std=c99 -O2 -Wall -Wextra -Werror -fPIC -shared edgewise_clientid.c -o edgewise_clientid.so
 * with mosquitto_broker.h, mosquitto_plugin.h (Debian: mosquitto-dev) and mosquitto.h
 * (libmosquitto-dev). Load it in mosquitto.conf with: plugin /path/to/edgewise_clientid.so
 */
#include <stddef.h>
#include <string.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

static mosquitto_plugin_id_t *plugin_id = NULL;

#define SHOWN_MAX 128

/* text as a log-safe string in out: printable ASCII kept, every other byte shown as '?', cut at
 * SHOWN_MAX bytes (the client id and username come from the network). */
static const char *shown(const char *text, char out[SHOWN_MAX + 4])
{
	size_t i;
	if(text == NULL){
		text = "";
	}
	for(i = 0; text[i] != '\0' && i < SHOWN_MAX; i++){
		unsigned char c = (unsigned char)text[i];
		out[i] = (c >= 0x20 && c < 0x7f) ? (char)c : '?';
	}
	if(text[i] != '\0'){
		out[i++] = '.';
		out[i++] = '.';
		out[i++] = '.';
	}
	out[i] = '\0';
	return out;
}

/* Whether client_id is username itself or "username:<anything>". */
static int id_belongs_to(const char *client_id, const char *username)
{
	size_t n = strlen(username);
	if(strncmp(client_id, username, n) != 0){
		return 0;
	}
	return client_id[n] == '\0' || client_id[n] == ':';
}

static int on_basic_auth(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_basic_auth *ed = event_data;
	const char *client_id;
	char id_shown[SHOWN_MAX + 4];
	char user_shown[SHOWN_MAX + 4];

	(void)event;
	(void)userdata;
	if(ed->username == NULL || ed->username[0] == '\0'){
		/* Anonymous: not ours to judge. allow_anonymous false refuses it. */
		return MOSQ_ERR_PLUGIN_DEFER;
	}
	client_id = mosquitto_client_id(ed->client);
	if(client_id != NULL && id_belongs_to(client_id, ed->username)){
		return MOSQ_ERR_PLUGIN_DEFER;
	}
	mosquitto_log_printf(MOSQ_LOG_NOTICE,
			"edgewise_clientid: refused client id '%s' for username '%s': "
			"the client id must be the username or start with the username and ':'",
			shown(client_id, id_shown), shown(ed->username, user_shown));
	return MOSQ_ERR_AUTH;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	int i;
	for(i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5){
			return 5;
		}
	}
	return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata,
		struct mosquitto_opt *options, int option_count)
{
	(void)userdata;
	(void)options;
	(void)option_count;
	plugin_id = identifier;
	return mosquitto_callback_register(plugin_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL, NULL);
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
	(void)userdata;
	(void)options;
	(void)option_count;
	return mosquitto_callback_unregister(plugin_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL);
}
