DROP INDEX messages_client_id;
DROP TABLE messages;

DROP INDEX members_by_user;
DROP TABLE members;
DROP TABLE chat_groups;
DROP TABLE conversations;
DROP TABLE users;
